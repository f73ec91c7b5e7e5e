"""A regression model served: POST /predict answers values, v2 a ``value`` tensor (JSON and binary),
/metadata says task regression, shadow and canary compare and answer values, the payload log keeps
them, `fluxo serve`'s example request works, and `fluxo predict` writes a ``value`` column.

Everything runs on a real exported table graph (models/preprocess.TableModel with a target
rescaling, as `fluxo export` writes a table regression), checked against onnxruntime itself.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.contract import TableInput
from serving.table_rows import row_object
from tests.serving.test_table_rows import COLUMNS

TARGET = {"mean": 150.0, "std": 50.0}
RAW = np.array([[0.01, 120.5, 2, -1], [0.0, np.nan, 0, 2.5], [-0.02, 900, np.nan, 0], [0.03, 480, 1, 4]],
               dtype=np.float32)


def build_regression_model_dir(path: Path, seed: int = 0, model_version: str = "1",
                               name: str = "fluxo-regression") -> Path:
    """model.onnx as `fluxo export` writes a table regression (encoding and the target's rescaling inside
    the graph: one output, the value in the target's units) and its metadata.json; a few seconds."""
    import torch

    from models.preprocess import TableInput as Encode
    from models.preprocess import TableModel
    from pipelines.export.onnx_export import export_onnx
    from serving.contract import ModelMetadata

    torch.manual_seed(seed)
    inner = torch.nn.Linear(Encode(COLUMNS).out_features, 1)
    path.mkdir(parents=True, exist_ok=True)
    export_onnx(TableModel(inner, COLUMNS, TARGET).eval(), (len(COLUMNS),), path / "model.onnx", 18)
    meta = ModelMetadata(model_name=name, architecture="tabular_mlp", kind="table", dataset="mixed",
                         task="regression", input_shape=[len(COLUMNS)], labels=["target"],
                         table=TableInput(columns=COLUMNS), onnx_opset=18,
                         test_metrics={"test_r2": 0.5, "test_mae": 30.0, "test_rmse": 40.0},
                         example_instance=row_object(RAW[0], TableInput(columns=COLUMNS)))
    data = meta.model_dump(mode="json")
    data["model_version"] = model_version
    (path / "metadata.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def onnx_values(model_dir: Path, raw: np.ndarray) -> np.ndarray:
    """The graph run straight in onnxruntime: (n,) values, the reference every answer must equal."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(Path(model_dir) / "model.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input": np.asarray(raw, dtype=np.float32)})
    assert out.shape == (len(raw), 1)
    return out[:, 0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_regression_model_dir(tmp_path_factory.mktemp("regression") / "m")


@pytest.fixture(scope="module")
def challenger_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_regression_model_dir(tmp_path_factory.mktemp("regression2") / "m", seed=1, model_version="2")


def objects(raw: np.ndarray) -> list[dict[str, Any]]:
    return [row_object(r, TableInput(columns=COLUMNS)) for r in raw]


def _v2_data(raw: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in raw.ravel()]


def _serve(config: Any, calls: list[tuple[str, str, Any, dict[str, str]]]) -> tuple[list[Any], Any]:
    """``calls`` (method, path, JSON body or raw bytes, headers) on the app in process; (responses, server).
    Shadow runs are awaited before the loop ends; the server is closed (the payload log sealed)."""
    import httpx

    from serving.app import create_app
    from serving.server import ModelServer

    service = create_app()
    server = service.state.server = ModelServer(config)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=service), base_url="http://fluxo") as client:
            out = []
            for method, path, body, headers in calls:
                if method == "GET":
                    out.append(await client.get(path, headers=headers))
                elif isinstance(body, bytes):
                    out.append(await client.post(path, content=body, headers=headers))
                else:
                    out.append(await client.post(path, json=body, headers=headers))
            if server._shadow_tasks:
                await asyncio.wait(set(server._shadow_tasks), timeout=30)
            return out

    try:
        return asyncio.run(run()), server
    finally:
        server.close()


def test_predict_v2_and_metadata_answer_the_graphs_values(model_dir: Path) -> None:
    from serving import ServingConfig

    expected = onnx_values(model_dir, RAW)
    header = json.dumps({"inputs": [{"name": "input", "shape": [4, 4], "datatype": "FP32",
                                     "parameters": {"binary_data_size": RAW.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    binary_headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    (predict, by_list, metadata, v2_meta, v2, v2_binary, wrong_output, openapi), _ = _serve(
        ServingConfig(model_dir=model_dir, provider="cpu"), [
            ("POST", "/predict", {"instances": objects(RAW)}, {}),
            ("POST", "/predict", {"instances": [[o[c["name"]] for c in COLUMNS] for o in objects(RAW)]}, {}),
            ("GET", "/metadata", None, {}),
            ("GET", "/v2/models/fluxo-regression", None, {}),
            ("POST", "/v2/models/fluxo-regression/infer",
             {"id": "r1", "inputs": [{"name": "input", "shape": [4, 4], "datatype": "FP32", "data": _v2_data(RAW)}]},
             {}),
            ("POST", "/v2/models/fluxo-regression/infer", header + RAW.tobytes(), binary_headers),
            ("POST", "/v2/models/fluxo-regression/infer",
             {"inputs": [{"name": "input", "shape": [4, 4], "datatype": "FP32", "data": _v2_data(RAW)}],
              "outputs": [{"name": "probabilities"}]}, {}),
            ("GET", "/openapi.json", None, {}),
        ])
    assert predict.status_code == 200, predict.text
    answer = predict.json()
    assert set(answer) == {"predictions", "model_version"} and answer["model_version"] == "1"
    assert all(set(p) == {"value"} for p in answer["predictions"])
    values = np.array([p["value"] for p in answer["predictions"]])
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    assert np.ptp(values) > 1.0  # the rows are told apart, in the target's units (mean 150)
    assert by_list.json() == answer

    meta = metadata.json()
    assert meta["task"] == "regression" and meta["labels"] == ["target"] and meta["kind"] == "table"
    assert v2_meta.json()["outputs"] == [{"name": "value", "datatype": "FP32", "shape": [-1, 1]}]

    assert v2.status_code == 200, v2.text
    document = v2.json()
    assert document["id"] == "r1" and document["model_version"] == "1"
    (tensor,) = document["outputs"]
    assert tensor["name"] == "value" and tensor["datatype"] == "FP32" and tensor["shape"] == [4, 1]
    np.testing.assert_allclose(tensor["data"], expected, rtol=1e-6)

    assert v2_binary.status_code == 200, v2_binary.text
    length = int(v2_binary.headers["inference-header-content-length"])
    head = json.loads(v2_binary.content[:length])
    (tensor,) = head["outputs"]
    assert tensor["name"] == "value" and tensor["shape"] == [4, 1] and tensor["parameters"]["binary_data_size"] == 16
    got = np.frombuffer(v2_binary.content[length:], dtype="<f4")
    np.testing.assert_array_equal(got, expected)

    assert wrong_output.status_code == 400 and "['value']" in wrong_output.json()["error"]

    schemas = openapi.json()["components"]["schemas"]
    assert set(schemas["ValuePrediction"]["properties"]) == {"value"}
    assert set(schemas["Prediction"]["properties"]) == {"label", "probabilities"}
    refs = json.dumps(schemas["PredictResponse"]["properties"]["predictions"])
    assert "#/components/schemas/Prediction" in refs and "#/components/schemas/ValuePrediction" in refs
    assert "task" in schemas["MetadataResponse"]["properties"]


def test_the_example_request_fluxo_serve_prints_is_answered(model_dir: Path) -> None:
    from serving import ServingConfig
    from serving.client import example_request
    from serving.runtime import load_metadata

    meta = load_metadata(model_dir)
    printed = example_request(meta, "http://127.0.0.1:3000", instances=[meta["example_instance"]])
    default = example_request(meta)  # no real instance known: the table's default row, by column name
    assert isinstance(printed["body"]["instances"][0], dict) and isinstance(default["body"]["instances"][0], dict)
    assert set(default["body"]["instances"][0]) == {c["name"] for c in COLUMNS}
    assert default["body"]["instances"][0]["colour"] == "blue"
    payload = printed["curl"].split("-d ", 1)[1]
    assert json.loads(payload.strip("'")) == printed["body"]
    (first, second), _ = _serve(ServingConfig(model_dir=model_dir, provider="cpu"), [
        ("POST", "/predict", printed["body"], {}), ("POST", "/predict", default["body"], {})])
    assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
    np.testing.assert_allclose(first.json()["predictions"][0]["value"], onnx_values(model_dir, RAW[:1])[0], rtol=1e-6)
    assert set(second.json()["predictions"][0]) == {"value"}


def test_the_payload_log_keeps_each_value(model_dir: Path, tmp_path: Path) -> None:
    from serving import ServingConfig
    from serving.payload_log import read_payloads

    (answer,), _ = _serve(ServingConfig(model_dir=model_dir, provider="cpu", payload_log=tmp_path / "log",
                                        payload_flush_s=0.05), [("POST", "/predict", {"instances": objects(RAW)}, {})])
    assert answer.status_code == 200
    table = read_payloads(tmp_path / "log").to_pylist()
    assert len(table) == 1
    record = table[0]
    np.testing.assert_allclose(record["probabilities"], onnx_values(model_dir, RAW), rtol=1e-6)  # one value each
    assert record["labels"] == ["target"] * 4 and record["input_shape"] == [4, 4]
    assert np.asarray(record["probabilities"], np.float32).reshape(4, -1).shape == (4, 1)  # as the monitor reads it


def test_shadow_compares_values_within_the_tolerance_and_canary_answers_the_challengers(
    model_dir: Path, challenger_dir: Path
) -> None:
    from serving import ServingConfig
    from serving.metrics import get_metrics
    from serving.rollout import agreements, value_tolerance

    metrics = get_metrics()
    before = {k: metrics._outcomes[k]._value.get() for k in ("agree", "disagree", "error")}
    rng = np.random.default_rng(4)
    raw = np.column_stack([rng.normal(0, 0.01, 40), rng.uniform(0, 1000, 40), rng.integers(0, 3, 40),
                           rng.normal(0, 2, 40)]).astype(np.float32)
    (answer,), server = _serve(
        ServingConfig(model_dir=model_dir, provider="cpu", rollout="shadow", challenger_dir=challenger_dir), [
            ("POST", "/predict", {"instances": objects(raw)}, {})])
    assert answer.status_code == 200 and answer.headers["x-fluxo-variant"] == "champion"
    champion, challenger = onnx_values(model_dir, raw), onnx_values(challenger_dir, raw)
    np.testing.assert_allclose([p["value"] for p in answer.json()["predictions"]], champion, rtol=1e-6)
    atol = value_tolerance(server.live.info)
    assert atol == pytest.approx(4.0)  # a tenth of the champion's test RMSE (40)
    expected = agreements(champion[:, None], challenger[:, None], regression=True, atol=atol)
    within = np.abs(challenger - champion) <= np.maximum(0.05 * np.abs(champion), atol)
    assert expected == int(within.sum())
    delta = {k: metrics._outcomes[k]._value.get() - before[k] for k in before}
    assert delta == {"agree": expected, "disagree": 40 - expected, "error": 0}

    (canary,), _ = _serve(ServingConfig(model_dir=model_dir, provider="cpu", rollout="canary", canary_share=1.0,
                                        challenger_dir=challenger_dir), [
        ("POST", "/predict", {"instances": objects(RAW)}, {}),
    ])
    assert canary.headers["x-fluxo-variant"] == "challenger" and canary.json()["model_version"] == "2"
    np.testing.assert_allclose([p["value"] for p in canary.json()["predictions"]], onnx_values(challenger_dir, RAW),
                               rtol=1e-6)


def test_a_classifier_cannot_be_a_regression_models_challenger(model_dir: Path, tmp_path: Path) -> None:
    from serving import ServingConfig
    from serving.rollout import rollout_mismatch
    from serving.runtime import load_metadata, public_metadata

    classifier = tmp_path / "classifier"
    classifier.mkdir()
    (classifier / "model.onnx").write_bytes((model_dir / "model.onnx").read_bytes())
    meta = load_metadata(model_dir) | {"task": "binary"}  # same graph and input contract, another task
    (classifier / "metadata.json").write_text(json.dumps(meta), encoding="utf-8")
    assert "task" in rollout_mismatch(public_metadata(load_metadata(model_dir), "cpu"),
                                      public_metadata(load_metadata(classifier), "cpu"))
    (answer, metadata), server = _serve(
        ServingConfig(model_dir=model_dir, provider="cpu", rollout="shadow", challenger_dir=classifier), [
            ("POST", "/predict", {"instances": objects(RAW[:1])}, {}), ("GET", "/metadata", None, {})])
    assert answer.status_code == 200 and server.challenger is None
    assert "task" in metadata.json()["rollout"]["challenger_error"]


def test_a_regression_model_with_several_labels_is_refused_at_load(model_dir: Path, tmp_path: Path) -> None:
    from serving import ServingError
    from serving.runtime import OnnxModel, load_metadata

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes((model_dir / "model.onnx").read_bytes())
    (broken / "metadata.json").write_text(json.dumps(load_metadata(model_dir) | {"labels": ["a", "b"]}), "utf-8")
    with pytest.raises(ServingError, match="regression"):
        OnnxModel(broken, providers=["CPUExecutionProvider"])


def test_fluxo_predict_writes_the_graphs_values(model_dir: Path, project: Path) -> None:
    import pandas as pd
    import pyarrow.parquet as pq

    from tests.conftest import SMOKE

    source = project / "rows.csv"
    frame = pd.DataFrame(objects(RAW))
    frame.insert(0, "id", ["a", "b", "c", "d"])
    frame.to_csv(source, index=False)
    out = project / "preds.parquet"
    stores = project.parent
    done = subprocess.run(
        [str(Path(sys.executable).with_name("fluxo")), "predict", str(source), "-o", str(out), "--model",
         str(model_dir), "--root", str(project), "--config", str(SMOKE),
         "--set", f"tracking.tracking_uri=sqlite:///{stores / 'mlflow.db'}",
         "--set", f"data.dvc_remote={stores / 'dvc-remote'}"],
        capture_output=True, text=True, timeout=300, cwd=project)
    assert done.returncode == 0, done.stdout + done.stderr
    table = pq.read_table(out)
    assert table.column_names == ["id", "value", "model_version"]
    assert table.column("id").to_pylist() == ["a", "b", "c", "d"]
    np.testing.assert_allclose(table.column("value").to_numpy(), onnx_values(model_dir, RAW), rtol=1e-6)
    assert set(table.column("model_version").to_pylist()) == {"1"}


def test_agreements_of_values_use_the_relative_or_the_absolute_tolerance() -> None:
    from serving.rollout import agreements, value_tolerance

    champion = np.array([[100.0], [0.0], [10.0], [-50.0]], np.float32)
    challenger = np.array([[104.0], [0.5], [12.0], [-52.0]], np.float32)
    assert agreements(champion, challenger, regression=True) == 2  # 4 within 5% of 100, 2 within 5% of 50; 2 of 10 is not
    assert agreements(champion, challenger, regression=True, atol=1.0) == 3  # 0.5 from 0 agrees by the absolute part
    assert agreements(champion, challenger) == 4  # the classifier's argmax: one column, always equal
    assert value_tolerance({"test_metrics": {"test_rmse": 20.0}}) == pytest.approx(2.0)
    assert value_tolerance({"test_metrics": {}}) == 0.0


def test_binary_output_struct_layout_is_little_endian_float32(model_dir: Path) -> None:
    """The answer's bytes as tritonclient reads them (``np.frombuffer(..., "<f4")``) and as struct reads them."""
    from serving import v2
    from serving.v2_binary import binary_response

    values = np.array([[1.5], [-2.25]], np.float32)
    document = v2.infer_response("m", "1", None, ["value"], values, ["target"])
    response = binary_response(document, frozenset({"value"}))
    length = int(response.headers["inference-header-content-length"])
    assert struct.unpack("<2f", response.body[length:]) == (1.5, -2.25)
