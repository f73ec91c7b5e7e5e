"""`fluxo predict` on a table model: columns read by name, encoded as the service encodes them.

The installed ``fluxo`` CLI runs as a subprocess in a fresh project, on a table model directory
exported from models/preprocess.TableModel (tests/serving/test_table_rows.py builds it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tests.conftest import SMOKE
from tests.serving.test_table_rows import COLUMNS, build_table_model_dir, table
from tests.serving_fixtures import onnx_probabilities

FLUXO = Path(sys.executable).parent / "fluxo"


@pytest.fixture(scope="module")
def table_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_table_model_dir(tmp_path_factory.mktemp("table") / "fluxo-table")


def _fluxo(project: Path, *args: str) -> subprocess.CompletedProcess:
    stores = project.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXO_") and not k.startswith("MLFLOW_")}
    return subprocess.run(
        [str(FLUXO), "predict", *args, "--root", str(project), "--config", str(SMOKE),
         "--set", f"tracking.tracking_uri=sqlite:///{stores / 'mlflow.db'}",
         "--set", f"data.dvc_remote={stores / 'dvc-remote'}"],
        capture_output=True, text=True, env=env, timeout=120, cwd=project,
    )


def _summary(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout[done.stdout.index("{"):])


def _frame() -> pd.DataFrame:
    """Columns out of the model's order, a label column, empty cells, an unseen colour and two bad rows."""
    rng = np.random.default_rng(3)
    n = 40
    frame = pd.DataFrame({
        "label": rng.choice(["low", "mid", "high"], n),
        "noise": rng.normal(0, 1.5, n),
        "colour": rng.choice(["red", "green", "blue", "purple", None], n),
        "huge": rng.uniform(0, 1000, n),
        "tiny": rng.normal(0, 0.01, n),
    })
    frame.loc[[4, 9], "huge"] = np.nan
    frame["huge"] = frame["huge"].astype(object)
    frame.loc[7, "huge"] = "lots"  # not a number: that row alone is refused
    return frame


def _expected(frame: pd.DataFrame, keep: np.ndarray) -> np.ndarray:
    """The raw rows the service would build from each row as a client object (serving/table_rows.py)."""
    from serving.table_rows import validate_rows

    rows = []
    for _, record in frame[keep].iterrows():
        row = {}
        for column in COLUMNS:
            value = record[column["name"]]
            row[column["name"]] = None if value is None or (isinstance(value, float) and np.isnan(value)) else value
        rows.append(row)
    x, _ = validate_rows(rows, table(), len(rows))
    return x


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_predictions_equal_the_graph_on_rows_encoded_as_the_service_encodes_them(
        project: Path, table_model: Path, suffix: str) -> None:
    frame = _frame()
    source = project / f"rows{suffix}"
    if suffix == ".csv":
        frame.to_csv(source, index=False)
    else:
        frame.assign(huge=pd.to_numeric(frame["huge"], errors="coerce")).to_parquet(source)
    out = project / "out" / "preds.parquet"
    summary = _summary(_fluxo(project, str(source), "-o", str(out), "--model", str(table_model)))
    bad = {7} if suffix == ".csv" else set()
    keep = np.array([i not in bad for i in range(len(frame))])
    assert summary["rows"] == len(frame) - len(bad) and summary["skipped"] == len(bad)
    purple = int((frame["colour"] == "purple").sum())
    assert summary["unseen_categories"] == {"colour": purple} and purple > 0
    written = pq.read_table(out).to_pydict()
    assert written["id"] == [str(i) for i in range(len(frame)) if i not in bad]
    source_frame = frame.assign(huge=pd.to_numeric(frame["huge"], errors="coerce"))
    expected = onnx_probabilities(table_model, _expected(source_frame, keep))
    np.testing.assert_allclose(np.array(written["probabilities"]), expected, rtol=1e-5, atol=1e-6)
    errors = json.loads((project / "out" / "preds.errors.json").read_text())
    if bad:
        assert errors["rows"][0]["id"] == "7" and "'huge'" in errors["rows"][0]["reason"]
        assert "'lots'" in errors["rows"][0]["reason"] and "expected a number" in errors["rows"][0]["reason"]
        failed = _fluxo(project, str(source), "-o", str(project / "strict.parquet"), "--model", str(table_model),
                        "--on-error", "fail")
        assert failed.returncode != 0 and "row 7" in failed.stderr + failed.stdout
    else:
        assert errors["rows"] == []


def test_a_missing_column_names_the_column_and_the_file(project: Path, table_model: Path) -> None:
    source = project / "short.csv"
    _frame().drop(columns=["huge"]).to_csv(source, index=False)
    done = _fluxo(project, str(source), "-o", str(project / "out.parquet"), "--model", str(table_model))
    said = done.stdout + done.stderr
    assert done.returncode != 0 and str(source) in said and "'huge'" in said and "by name" in said
    assert not (project / "out.parquet").exists()
