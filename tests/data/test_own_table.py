"""A user's table, the way the README's "Your own table" walks it: the installed `fluxo`, a fresh process
per command, a clone-shaped project with a fresh HOME (tests/users.py).

A CSV of named columns on scales from 1e-2 to 1e3, with a text column and empty cells, is read as
a table (not as a sequence), trained with its columns scaled inside the graph, gated against the
scaled linear model trained beside it, and served: raw, unscaled rows as lists or as objects keyed
by column name give the in-process model's answer; a row missing a column, or with text in a
number column, is a 400 naming the column.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import store_client
from tests.serving_fixtures import free_port
from tests.users import Project, one_error_line, stop, wait_for

pytestmark = pytest.mark.e2e


def _json(result) -> dict:
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return json.loads(result.stdout[result.stdout.index("{"):])


def mixed_table(path: Path, rows: int = 600, seed: int = 0) -> pd.DataFrame:
    """Columns on scales 1e-2 to 1e3, a text column, empty cells; the label depends on all three kinds."""
    rng = np.random.default_rng(seed)
    tiny = rng.normal(0, 0.01, rows)
    huge = rng.normal(500, 300, rows)
    colour = rng.choice(["red", "green", "blue"], rows)
    noise = rng.normal(0, 1, rows)
    score = tiny / 0.01 + (huge - 500) / 300 + 1.5 * (colour == "red") + 0.2 * noise
    frame = pd.DataFrame({"tiny": tiny, "huge": huge, "colour": colour, "noise": noise,
                          "label": np.where(score > 0.3, "yes", "no")})
    frame.loc[rng.choice(rows, 40, replace=False), "huge"] = np.nan
    frame.loc[rng.choice(rows, 20, replace=False), "colour"] = None
    frame.to_csv(path, index=False)
    return frame


def _raw_rows(frame: pd.DataFrame, metadata: dict) -> np.ndarray:
    """The graph's input for ``frame``'s rows: numbers as they are, text as its vocabulary index, NaN for empty."""
    columns = metadata["table"]["columns"]
    out = np.empty((len(frame), len(columns)), dtype=np.float32)
    for j, column in enumerate(columns):
        values = frame[column["name"]]
        if column["type"] == "category":
            out[:, j] = values.map({v: i for i, v in enumerate(column["categories"])}).astype(float).to_numpy()
        else:
            out[:, j] = values.to_numpy(dtype=float)
    return out


def _objects(frame: pd.DataFrame) -> list[dict]:
    return [{k: (None if pd.isna(v) else v) for k, v in row.items()} for row in frame.to_dict("records")]


def test_a_table_is_scaled_in_the_graph_gated_against_a_linear_model_and_served_by_column_name(
    tmp_path: Path,
) -> None:
    user = Project.clone_shaped(tmp_path)
    frame = mixed_table(user.root / "mixed.csv")
    summary = _json(user.fluxo("data", "ingest", "--dataset", "mixed.csv"))
    assert summary["kind"] == "table" and summary["input_shape"] == [4], summary

    ran = user.fluxo("run", "--set", "data.dataset=mixed.csv", "--set", "export.variants=[]")
    output = ran.stdout + ran.stderr
    assert "model.name is unset: training tabular_mlp, the default for tables (4 columns)" in output, output[-3000:]
    assert "empty cells in 'huge' (40), 'colour' (20): imputed with the training split's median" in output
    result = _json(ran)
    run = store_client(user.root / "mlflow" / "mlflow.db").get_run(result["run_id"])
    verdict = run.data.tags["fluxo.baseline"]
    assert "linear_val_accuracy" in run.data.metrics and "baseline_val_accuracy" in run.data.metrics
    # The trained model beats the linear reference, or is within its noise; or the gate refuses it.
    assert result["promoted"] == (verdict != "worse"), (verdict, result)
    assert result["test_metrics"]["test_accuracy"] > 0.85, result  # an unscaled MLP stays near the majority class

    model_dir = Path(result["served_dir"])
    metadata = json.loads((model_dir / "metadata.json").read_text())
    assert [c["name"] for c in metadata["table"]["columns"]] == ["tiny", "huge", "colour", "noise"]
    assert metadata["table"]["columns"][2]["categories"] == ["blue", "green", "red"]

    # The in-process model, from the run's checkpoint, on raw unscaled rows.
    from pipelines.train.checkpoint import load_checkpoint, rebuild_model

    model, _ = rebuild_model(load_checkpoint(user.root / ".fluxo" / "checkpoints" / result["run_id"] / "best.pt"))
    sample = frame.drop(columns="label").iloc[:40]
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(_raw_rows(sample, metadata))), 1).numpy()

    port = free_port()
    server, log = user.start("serve", "--port", str(port), "--model", str(model_dir))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, "the server to be ready",
                 timeout=180, process=server)
        objects = _objects(sample)
        by_name = httpx.post(f"{url}/predict", json={"instances": objects}, timeout=30)
        assert by_name.status_code == 200, by_name.text
        as_lists = httpx.post(f"{url}/predict", json={"instances": [list(o.values()) for o in objects]}, timeout=30)
        assert as_lists.status_code == 200, as_lists.text
        assert by_name.json()["predictions"] == as_lists.json()["predictions"]
        served = np.array([p["probabilities"] for p in by_name.json()["predictions"]])
        assert np.abs(served - expected).max() < 1e-4

        served_meta = httpx.get(f"{url}/metadata", timeout=10).json()
        assert [c["name"] for c in served_meta["table"]["columns"]] == ["tiny", "huge", "colour", "noise"]

        missing = dict(objects[0])
        del missing["huge"]
        refused = httpx.post(f"{url}/predict", json={"instances": [missing]}, timeout=10)
        assert refused.status_code == 400 and "'huge'" in refused.text, refused.text
        text = dict(objects[0], tiny="small")
        refused = httpx.post(f"{url}/predict", json={"instances": [text]}, timeout=10)
        assert refused.status_code == 400 and "'tiny'" in refused.text and "small" in refused.text, refused.text
    finally:
        code = stop(server)
    assert code == 0, log.read_text()[-3000:]


# A whole run for the refusal; the gate's rule itself is tested in the fast suite (tests/export/test_export.py).
@pytest.mark.slow
def test_a_chance_level_model_is_not_made_champion(tmp_path: Path) -> None:
    """A first version far below the baselines trained beside it becomes the challenger, with the reason."""
    user = Project.clone_shaped(tmp_path)
    mixed_table(user.root / "mixed.csv")
    result = _json(user.fluxo("run", "--set", "data.dataset=mixed.csv", "--set", "export.variants=[]",
                              "--set", "model.name=tabular_mlp", "--set", "train.epochs=1",
                              "--set", "train.learning_rate=1e-7"))
    assert not result["promoted"] and result["alias"] == "challenger", result
    assert "worse than a baseline its run trained beside it" in result["promotion"], result["promotion"]
    assert "gate.beat_baselines" in result["promotion"]


def test_what_a_table_cannot_hold_is_named_with_the_fix(tmp_path: Path) -> None:
    user = Project.clone_shaped(tmp_path)
    frame = mixed_table(user.root / "mixed.csv", rows=120)

    # A text column with too many values: refused with its name and count.
    frame.assign(customer=[f"c{i}" for i in range(len(frame))]).to_csv(user.root / "ids.csv", index=False)
    line = one_error_line(user.fluxo("data", "ingest", "--dataset", "ids.csv"))
    assert "text column 'customer' (120 distinct values)" in line and "data.sequence.max_categories" in line, line

    # Empty cells under the refuse policy: the columns and counts, and the setting that imputes.
    line = one_error_line(user.fluxo("data", "ingest", "--dataset", "mixed.csv",
                                     "--set", "data.sequence.missing=refuse"))
    assert "'huge'" in line and "'colour'" in line and "data.sequence.missing=impute" in line, line

    # An explicit label column that is not there is never replaced by a convention.
    np.savez(user.root / "xy.npz", x=np.random.default_rng(0).normal(size=(40, 8)), y=np.arange(40) % 2)
    line = one_error_line(user.fluxo("data", "ingest", "--dataset", "xy.npz",
                                     "--set", "data.sequence.label_column=nope"))
    assert "no label array 'nope'; arrays are x, y" in line, line


def test_integer_targets_with_many_values_are_regression_and_numbered_columns_a_sequence(tmp_path: Path) -> None:
    user = Project.clone_shaped(tmp_path)
    rng = np.random.default_rng(0)
    features = pd.DataFrame(rng.normal(size=(300, 5)), columns=["age", "bmi", "bp", "s1", "s2"])
    features["label"] = (150 + 60 * features["bmi"] + 30 * features["bp"] + rng.normal(0, 20, 300)).round().astype(int)
    features.to_csv(user.root / "progress.csv", index=False)
    ingested = user.fluxo("data", "ingest", "--dataset", "progress.csv")
    summary = _json(ingested)
    assert summary["kind"] == "table" and summary["task"] == "regression", summary
    assert "set data.sequence.target=classification to treat them as classes" in ingested.stderr

    # The same numbers under numbered step names are a sequence; kind=table says otherwise.
    steps = features.rename(columns={c: f"t{i}" for i, c in enumerate(["age", "bmi", "bp", "s1", "s2"])})
    steps.assign(label=np.arange(300) % 3).to_csv(user.root / "steps.csv", index=False)
    assert _json(user.fluxo("data", "ingest", "--dataset", "steps.csv"))["kind"] == "sequence"
    forced = _json(user.fluxo("data", "ingest", "--dataset", "steps.csv", "--set", "data.sequence.kind=table"))
    assert forced["kind"] == "table" and forced["task"] == "classification", forced

    # Empty cells in the last column only: still a table (ragged sequences end at three lengths or more).
    features.loc[::4, "s2"] = np.nan
    features.to_csv(user.root / "gaps.csv", index=False)
    assert _json(user.fluxo("data", "ingest", "--dataset", "gaps.csv"))["kind"] == "table"
