"""Which models a table is raced and trained with: table models always; sequence models only when
nobody said it is a table and its columns could be steps, reading them as one channel's steps while
the graph still takes the table's rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.context import open_run
from pipelines.data.ingest import ingest, version
from pipelines.data.store import read_dataset
from pipelines.errors import FluxoError
from pipelines.release import export_run
from pipelines.train.auto import portfolio
from pipelines.train.preflight import check_trainable
from pipelines.train.run import train


def _waves(path: Path, rows: int = 240, names: list[str] | None = None) -> Path:
    """Sine waves, slow or fast, under column names that do not say they are steps."""
    rng = np.random.default_rng(0)
    frequency = rng.uniform(0.5, 3.0, size=rows)
    t = np.linspace(0, 2 * np.pi, 24)
    x = np.sin(frequency[:, None] * t[None]) + 0.05 * rng.normal(size=(rows, 24))
    frame = pd.DataFrame(x, columns=names or [f"reading_{chr(97 + i)}" for i in range(24)])
    frame["label"] = np.where(frequency > 1.75, "fast", "slow")
    frame.to_csv(path, index=False)
    return path


def test_a_table_that_could_be_steps_races_sequence_models_too_and_serves_rows(
    project: Path, settings_for, tmp_path: Path
) -> None:
    csv = _waves(tmp_path / "readings.csv")
    settings = settings_for(f"data.dataset={csv}", "model.name=cnn1d", "model.params={}", "train.epochs=15",
                            "train.learning_rate=0.01")
    ingest(project, settings_for(f"data.dataset={csv}").data)  # as `fluxo data ingest` reads it: no model named
    dataset = read_dataset(project / "data")
    assert dataset.kind == "table" and dataset.manifest["preprocessing"]["table"]["as_steps"]
    racing = {c.model for c in portfolio(settings_for(f"data.dataset={csv}", "model.name=auto"), dataset)}
    assert {"linear", "tabular_mlp", "mlp", "cnn1d", "gru", "resnet1d"} <= racing, racing

    result = train(open_run(project, settings), version(project, settings.data))
    assert result.test_metrics["test_accuracy"] > 0.85
    exported = export_run(open_run(project, settings), result.run_id)
    assert exported.parity.passed
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported.export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    test = dataset.splits["test"]
    logits = session.run(None, {"input": np.asarray(test.x, dtype=np.float32)})[0]  # the table's rows, (n, 24)
    assert (logits.argmax(1) == test.y).mean() > 0.85


def test_a_table_said_to_be_a_table_or_with_text_is_raced_with_table_models_only(
    project: Path, settings_for, tmp_path: Path
) -> None:
    csv = _waves(tmp_path / "readings.csv")
    settings = settings_for(f"data.dataset={csv}", "data.sequence.kind=table")
    ingest(project, settings.data)
    dataset = read_dataset(project / "data")
    assert not dataset.manifest["preprocessing"]["table"]["as_steps"]
    racing = {c.model for c in portfolio(settings_for(f"data.dataset={csv}", "model.name=auto"), dataset)}
    assert racing == {"linear", "mlp", "tabular_mlp"}, racing
    with pytest.raises(FluxoError, match="model.name='gru' reads sequences but data/ holds .* as a table"):
        check_trainable(settings_for(f"data.dataset={csv}", "model.name=gru"), dataset)

    frame = pd.read_csv(csv).assign(site=lambda f: np.where(np.arange(len(f)) % 2, "north", "south"))
    frame.to_csv(tmp_path / "sites.csv", index=False)
    ingest(project, settings_for(f"data.dataset={tmp_path / 'sites.csv'}").data)
    with_text = read_dataset(project / "data")
    assert not with_text.manifest["preprocessing"]["table"]["as_steps"]
    assert "gru" not in {c.model for c in portfolio(settings_for("model.name=auto"), with_text)}
