"""Variable-length sequences served exactly: a GRU's graph takes lengths, and clients send ragged instances.

Real training and export (MLflow and DVC in tmp_path), real `bentoml serve`, real `fluxo predict`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipelines.context import open_run
from pipelines.data.ingest import ingest, version
from pipelines.data.store import read_dataset
from pipelines.registry.publish import model_root
from pipelines.release import export_run
from pipelines.predict.run import predict
from pipelines.train.run import train
from serving.runtime import softmax
from tests.conftest import make_settings
from tests.serving_fixtures import RunningServer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def walks(tmp_path_factory: pytest.TempPathFactory):
    """Sequences of 12 or 7 steps (trailing empty cells), a bidirectional GRU trained and exported on them."""
    root = tmp_path_factory.mktemp("ragged") / "project"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    rng = np.random.default_rng(0)
    values = rng.normal(size=(120, 12))
    labels = np.where(values[:, :7].mean(1) > 0, "up", "down")
    values[::2, 7:] = np.nan  # every other sequence is 7 steps long
    csv = root.parent / "walk.csv"
    frame = pd.DataFrame(values, columns=[f"t{i}" for i in range(12)])
    frame["label"] = labels
    frame.to_csv(csv, index=False)
    with pytest.MonkeyPatch.context() as env:  # set up before conftest's per-test isolation: clear it here
        for key in [k for k in os.environ if k.startswith("FLUXO_") or k == "MLFLOW_TRACKING_URI"]:
            env.delenv(key)
        settings = make_settings(root, f"data.dataset={csv}", "model.name=gru",
                                 "model.params={hidden: 8, bidirectional: true}", "train.epochs=3")
        ingest(root, settings.data)
        result = train(open_run(root, settings), version(root, settings.data))
        exported = export_run(open_run(root, settings), result.run_id)
    return root, settings, csv, exported, result


def _with_lengths(model_dir: Path, x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return softmax(session.run(None, {"input": np.asarray(x, np.float32), "lengths": np.asarray(lengths, np.int64)})[0])


def test_ragged_instances_over_http_get_the_trained_answers(walks, tmp_path: Path) -> None:
    root, settings, _, exported, result = walks
    test = read_dataset(root / "data").splits["test"]
    expected = _with_lengths(exported.export_dir, test.x, test.lengths)
    ragged = [np.asarray(x)[:, :n].tolist() for x, n in zip(test.x, test.lengths)]
    assert {len(r[0]) for r in ragged} == {7, 12}
    with RunningServer(model_root(root, settings, exported.registered_model), {}, tmp_path / "server.log") as server:
        assert httpx.get(f"{server.url}/metadata", timeout=10).json()["takes_lengths"] is True
        answer = httpx.post(f"{server.url}/predict", json={"instances": ragged}, timeout=30)
        assert answer.status_code == 200, answer.text
        got = np.array([p["probabilities"] for p in answer.json()["predictions"]])
        np.testing.assert_allclose(got, expected, atol=1e-5)
        accuracy = float((got.argmax(1) == np.asarray(test.y)).mean())
        assert accuracy == pytest.approx(result.test_metrics["test_accuracy"])  # served exactly as trained
        # The Open Inference Protocol: the zero-padded tensor plus an INT64 lengths input.
        name = exported.registered_model
        inputs = list(httpx.get(f"{server.url}/v2/models/{name}", timeout=10).json()["inputs"])
        assert [i["name"] for i in inputs] == ["input", "lengths"]
        body = {"inputs": [{"name": "input", "shape": [len(test.y), 1, 12], "datatype": "FP32",
                            "data": np.asarray(test.x, np.float32).ravel().tolist()},
                           {"name": "lengths", "shape": [len(test.y)], "datatype": "INT64",
                            "data": [int(n) for n in test.lengths]}]}
        v2 = httpx.post(f"{server.url}/v2/models/{name}/infer", json=body, timeout=30)
        assert v2.status_code == 200, v2.text
        out = next(o for o in v2.json()["outputs"] if o["name"] == "probabilities")
        np.testing.assert_allclose(np.asarray(out["data"]).reshape(out["shape"]), expected, atol=1e-5)
        body["inputs"][1]["data"][0] = 13
        refused = httpx.post(f"{server.url}/v2/models/{name}/infer", json=body, timeout=30)
        assert refused.status_code == 400 and "inputs[1].data[0] is 13; a length lies in 1..12" in refused.text
        full = np.asarray(test.x[:3]).tolist()  # full-length instances still take the fast path
        assert httpx.post(f"{server.url}/predict", json={"instances": full}, timeout=30).status_code == 200
        for bad, where in (([[0.0] * 13], "instances[0]: shape (1, 13)"), ([[]], "instances[0]: shape (1, 0)"),
                           ([[0.0] * 5, [0.0] * 5], "instances[0]: shape (2, 5)")):
            refused = httpx.post(f"{server.url}/predict", json={"instances": [bad]}, timeout=10)
            assert refused.status_code == 400 and where in refused.json()["error"], refused.text
            assert "(1, 1..12)" in refused.json()["error"]


def test_fluxo_predict_reads_each_row_to_its_own_end(walks, tmp_path: Path) -> None:
    root, settings, csv, exported, _ = walks
    result = predict(open_run(root, settings), csv, tmp_path / "preds.parquet", str(exported.export_dir), "fluxo-walk",
                     record=False)
    table = pq.read_table(tmp_path / "preds.parquet").to_pandas()
    values = pd.read_csv(csv).drop(columns=["label"]).to_numpy()
    lengths = np.where(np.isnan(values[:, 7:]).all(1), 7, 12)
    expected = _with_lengths(exported.export_dir, np.nan_to_num(values)[:, None, :], lengths)
    assert result.rows == len(values) == len(table)
    np.testing.assert_allclose(np.stack(table["probabilities"].to_numpy()), expected, atol=1e-5)


def test_fluxo_predict_reads_npz_lengths_and_parquet_lists_like_the_csv(walks, tmp_path: Path) -> None:
    """The training reader's two other variable-length layouts: NPZ ``lengths``, one Parquet list column."""
    root, settings, csv, exported, _ = walks
    values = pd.read_csv(csv).drop(columns=["label"]).to_numpy()
    lengths = np.where(np.isnan(values[:, 7:]).all(1), 7, 12)
    expected = _with_lengths(exported.export_dir, np.nan_to_num(values)[:, None, :], lengths)
    np.savez(tmp_path / "walk.npz", x=np.nan_to_num(values, nan=99.0), lengths=lengths)  # padding is never read
    sequences = [list(v[:n]) for v, n in zip(values, lengths)]
    ids = [f"w{i}" for i in range(len(sequences))]
    pd.DataFrame({"id": ids + ["long", "empty"], "steps": sequences + [[0.5] * 13, []]}).to_parquet(
        tmp_path / "walk.parquet")
    for source, want_ids in (("walk.npz", [str(i) for i in range(len(values))]), ("walk.parquet", ids)):
        out = tmp_path / f"{source}.preds.parquet"
        result = predict(open_run(root, settings), tmp_path / source, out, str(exported.export_dir), "fluxo-walk", record=False)
        table = pq.read_table(out).to_pandas()
        assert table["id"].tolist() == want_ids and result.rows == len(values)
        np.testing.assert_allclose(np.stack(table["probabilities"].to_numpy()), expected, atol=1e-5)
    reasons = {e["id"]: e["reason"] for e in result.errors}
    assert reasons == {"long": "has 13 values, the model takes at most 12",
                       "empty": "has no values; give at least one step"}


def test_a_fixed_length_model_refuses_short_npz_rows_by_name(tmp_path: Path) -> None:
    from pipelines.predict.sources import Contract, npz_chunks

    np.savez(tmp_path / "short.npz", x=np.ones((3, 1, 5)), lengths=np.array([5, 3, 5]))
    [chunk] = list(npz_chunks(tmp_path / "short.npz", Contract(input_shape=(1, 5)), 10))
    assert chunk.ids == ["0", "2"] and chunk.errors == [("1", "has 3 values, expected 5 (the model takes fixed-length rows)")]
    np.savez(tmp_path / "bad.npz", x=np.ones((2, 1, 5)), lengths=np.array([5, 6]))
    with pytest.raises(Exception, match=r"bad.npz: lengths\[1\] is 6; a length lies in 1..5"):
        list(npz_chunks(tmp_path / "bad.npz", Contract(input_shape=(1, 5)), 10))


def test_a_canary_on_zero_padding_answers_the_ragged_requests_the_champion_admits(walks, tmp_path: Path) -> None:
    """The champion's contract (lengths) is the service's; a cnn1d challenger gets the zeros it trained on."""
    root, settings, csv, exported, _ = walks
    padded = make_settings(root, f"data.dataset={csv}", "model.name=cnn1d", "train.epochs=2")
    challenger = export_run(open_run(root, padded), train(open_run(root, padded), version(root, padded.data)).run_id)
    test = read_dataset(root / "data").splits["test"]
    ragged = [np.asarray(x)[:, :n].tolist() for x, n in zip(test.x, test.lengths)]
    session = ort.InferenceSession(str(challenger.export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    expected = softmax(session.run(None, {"input": np.asarray(test.x, np.float32)})[0])  # zero-padded, as trained
    env = {"FLUXO_ROLLOUT": "canary", "FLUXO_CANARY_SHARE": "1", "FLUXO_CHALLENGER_DIR": str(challenger.export_dir)}
    with RunningServer(exported.export_dir, env, tmp_path / "server.log") as server:
        answer = httpx.post(f"{server.url}/predict", json={"instances": ragged}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-fluxo-variant"] == "challenger"
        got = np.array([p["probabilities"] for p in answer.json()["predictions"]])
        np.testing.assert_allclose(got, expected, atol=1e-5)
        body = {"inputs": [{"name": "input", "shape": [len(test.y), 1, 12], "datatype": "FP32",
                            "data": np.asarray(test.x, np.float32).ravel().tolist()},
                           {"name": "lengths", "shape": [len(test.y)], "datatype": "INT64",
                            "data": [int(n) for n in test.lengths]}]}
        v2 = httpx.post(f"{server.url}/v2/models/{exported.registered_model}/infer", json=body, timeout=30)
        assert v2.status_code == 200, v2.text
        out = next(o for o in v2.json()["outputs"] if o["name"] == "probabilities")
        np.testing.assert_allclose(np.asarray(out["data"]).reshape(out["shape"]), expected, atol=1e-5)
