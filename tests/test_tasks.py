"""Tasks, optimisers and schedules chosen by name, end to end through the engine on real (tiny) data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.data.ingest import ingest, version
from pipelines.errors import FluxoError
from pipelines.export.step import export_run
from pipelines.train.run import train, train_and_evaluate
from pipelines.train.tracker import NullTracker


def _waves(path: Path, regression: bool = False, rows: int = 240) -> Path:
    """Sine waves whose frequency is the target: a class (slow/fast) or the number itself."""
    rng = np.random.default_rng(0)
    frequency = rng.uniform(0.5, 3.0, size=rows)
    t = np.linspace(0, 2 * np.pi, 24)
    x = np.sin(frequency[:, None] * t[None]) + 0.05 * rng.normal(size=(rows, 24))
    frame = pd.DataFrame(x, columns=[f"t{i}" for i in range(24)])
    frame["label"] = frequency if regression else np.where(frequency > 1.75, "fast", "slow")
    frame.to_csv(path, index=False)
    return path


def test_binary_task_trains_exports_and_serves_two_probabilities(project: Path, settings_for, tmp_path: Path) -> None:
    settings = settings_for(f"data.dataset={_waves(tmp_path / 'waves.csv')}", "model.name=cnn1d", "model.params={}",
                            "train.task=binary", "train.epochs=15", "train.learning_rate=0.01")
    ingest(project, settings.data)
    data_version = version(project, settings.data)
    result = train(project, settings, data_version)
    assert {"test_accuracy", "test_f1", "test_roc_auc"} <= set(result.test_metrics)
    assert result.test_metrics["test_accuracy"] > 0.8
    exported = export_run(project, settings, result.run_id)
    assert exported.parity.passed
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported.export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": np.zeros((3, 1, 24), dtype=np.float32)})[0]
    assert logits.shape == (3, 2) and np.all(logits[:, 0] == 0)


def test_regression_task_reports_r2_and_is_not_exported_for_serving(project: Path, settings_for, tmp_path: Path) -> None:
    settings = settings_for(f"data.dataset={_waves(tmp_path / 'freq.csv', regression=True)}", "model.name=cnn1d",
                            "model.params={}", "train.epochs=20", "train.learning_rate=0.01")
    ingest(project, settings.data)
    data_version = version(project, settings.data)
    result = train(project, settings, data_version)
    assert set(result.test_metrics) == {"test_r2", "test_mse", "test_rmse", "test_mae"}
    assert result.test_metrics["test_r2"] > 0.5
    with pytest.raises(FluxoError, match="regression model trains and is tracked.*multiclass and binary"):
        export_run(project, settings, result.run_id)
    with pytest.raises(FluxoError, match="val_accuracy means nothing for regression"):
        train_and_evaluate(project, settings_for(f"data.dataset={tmp_path / 'freq.csv'}", "model.name=cnn1d",
                                                 "model.params={}", "train.monitor=val_accuracy"),
                           data_version, NullTracker())


@pytest.mark.parametrize(
    "method",
    [
        ["train.optimizer=sgd", "train.learning_rate=0.05"],
        ["train.optimizer=sgd", "train.momentum=0.9", "train.nesterov=true", "train.learning_rate=0.02"],
        ["train.optimizer=adagrad", "train.learning_rate=0.05"],
        ["train.optimizer=adadelta", "train.learning_rate=1.0"],
        ["train.optimizer=rmsprop", "train.learning_rate=0.002"],
        ["train.optimizer=adam"],
        ["train.optimizer=adamw", "train.weight_decay=0.01"],
        ["train.scheduler=step", "train.scheduler_options={step_size: 1, gamma: 0.5}"],
        ["train.scheduler=cosine"],
        ["train.scheduler=onecycle", "train.learning_rate=0.01"],
        ["train.l1=0.0001", "train.clip_norm=1.0"],
        ["train.task_options={label_smoothing: 0.1}", "model.params={channels: 8, dropout: 0.3}"],
        ["train.precision=bf16"],
    ],
    ids=lambda m: " ".join(m),
)
def test_each_method_by_name_learns_digits(project: Path, settings_for, method: list[str]) -> None:
    settings = settings_for("train.epochs=3", *method)
    ingest(project, settings.data)
    _, metrics, _, result = train_and_evaluate(
        project, settings, version(project, settings.data), NullTracker()
    )
    assert metrics["test_accuracy"] > 0.3, (method, result.history)  # chance is 0.1
    learning_rates = [h["learning_rate"] for h in result.history]
    if "train.scheduler=step" in method:
        assert learning_rates[1] == pytest.approx(learning_rates[0] * 0.5)


def test_unknown_optimizer_is_named() -> None:
    from pipelines.settings import load_settings

    with pytest.raises(FluxoError, match="train.optimizer"):
        load_settings(None, ["train.optimizer=lbfgs"])
