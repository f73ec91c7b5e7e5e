"""A table model's rows (serving/table_rows.py): lists and objects → the graph's input, the refusals,
and POST /predict, /metadata and v2 on a real exported table graph (models/preprocess.TableModel), in process."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.contract import TableInput
from serving.schemas import InvalidInstances, TooManyInstances
from serving.table_rows import row_object, validate_rows, validate_table_tensor

LABELS = ["low", "mid", "high"]
COLUMNS: list[dict[str, Any]] = [
    {"name": "tiny", "type": "number", "missing": 0, "median": 0.001, "center": 0.0, "scale": 0.01},
    {"name": "huge", "type": "number", "missing": 5, "median": 500.0, "center": 480.0, "scale": 280.0},
    {"name": "colour", "type": "category", "categories": ["blue", "green", "red"], "missing": 3},
    {"name": "noise", "type": "number", "missing": 0, "median": 0.0, "center": 0.1, "scale": 1.5},
]


def table(missing: str = "impute", unseen: str = "ignore") -> TableInput:
    return TableInput(columns=COLUMNS, missing=missing, unseen_category=unseen)


def build_table_model_dir(path: Path, missing: str = "impute", unseen: str = "ignore") -> Path:
    """model.onnx exported as `fluxo export` exports a table model (TableModel: imputation, indicator,
    scaling and one-hot inside the graph), and its metadata.json; seeded, a few seconds."""
    import torch

    from models.preprocess import TableInput as Encode
    from models.preprocess import TableModel
    from pipelines.export.onnx_export import export_onnx
    from serving.contract import ModelMetadata

    torch.manual_seed(0)
    inner = torch.nn.Linear(Encode(COLUMNS).out_features, len(LABELS))
    with torch.no_grad():
        inner.weight.mul_(6.0)
    path.mkdir(parents=True, exist_ok=True)
    export_onnx(TableModel(inner, COLUMNS).eval(), (len(COLUMNS),), path / "model.onnx", 18)
    meta = ModelMetadata(model_name="fluxo-table", architecture="tabular_mlp", kind="table", dataset="mixed",
                         input_shape=[len(COLUMNS)], labels=LABELS, table=table(missing, unseen), onnx_opset=18)
    data = meta.model_dump(mode="json")
    data["model_version"] = "1"
    (path / "metadata.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def refusal(instances: Any, t: TableInput | None = None, limit: int = 100) -> str:
    with pytest.raises(InvalidInstances) as caught:
        validate_rows(instances, t or table(), limit)
    return str(caught.value)


# --- validate_rows --------------------------------------------------------------------------------


def test_lists_and_objects_in_any_key_order_give_the_identical_array() -> None:
    as_lists = [[0.01, 120.5, "red", -1], [0.0, None, "blue", 2.5], [-0.003, 7, None, 0]]
    as_objects = [
        {"tiny": 0.01, "huge": 120.5, "colour": "red", "noise": -1},
        {"noise": 2.5, "colour": "blue", "huge": None, "tiny": 0.0},
        {"colour": None, "tiny": -0.003, "noise": 0, "huge": 7},
    ]
    x_lists, unseen_lists = validate_rows(as_lists, table(), 100)
    x_objects, unseen_objects = validate_rows(as_objects, table(), 100)
    assert x_lists.dtype == np.float32 and x_lists.shape == (3, 4)
    np.testing.assert_array_equal(x_lists, x_objects)  # NaN equal to NaN, position by position
    assert unseen_lists == unseen_objects == {}
    expected = np.array([[0.01, 120.5, 2, -1], [0, np.nan, 0, 2.5], [-0.003, 7, np.nan, 0]], dtype=np.float32)
    np.testing.assert_array_equal(x_lists, expected)
    mixed, _ = validate_rows([as_lists[0], as_objects[1], as_lists[2]], table(), 100)
    np.testing.assert_array_equal(mixed, x_lists)


def test_row_object_round_trips_through_validate_rows() -> None:
    raw = np.array([[0.25, np.nan, 1, 3.0], [1e-3, 10, np.nan, -2]], dtype=np.float32)
    rows = [row_object(r, table()) for r in raw]
    assert rows[0]["colour"] == "green" and rows[0]["huge"] is None
    np.testing.assert_array_equal(validate_rows(rows, table(), 10)[0], raw)


def test_a_missing_column_is_named() -> None:
    message = refusal([{"tiny": 0.1, "huge": 3, "colour": "red", "noise": 1}, {"tiny": 0.1, "colour": "red", "noise": 1}])
    assert message.startswith("instances[1]") and "'huge'" in message and "required" in message


def test_an_unknown_key_is_named_with_the_columns() -> None:
    message = refusal([{"tiny": 0.1, "huge": 3, "colour": "red", "noise": 1, "label": "mid"}])
    assert "instances[0]" in message and "'label'" in message
    for name in ("tiny", "huge", "colour", "noise"):
        assert repr(name) in message


def test_a_string_in_a_number_column_names_the_column_and_the_value() -> None:
    message = refusal([[0.1, 3, "red", 1], [0.1, "3.5", "red", 1]])
    assert message.startswith("instances[1]") and "'huge'" in message and "'3.5'" in message
    assert "expected a number" in message


@pytest.mark.parametrize("value,words", [(True, "boolean"), (float("nan"), "finite"), (float("inf"), "finite"),
                                         (1e39, "float32"), (10**400, "float32"), ([1], "list")])
def test_a_number_column_takes_finite_float32_numbers_only(value: Any, words: str) -> None:
    message = refusal([{"tiny": value, "huge": 3, "colour": "red", "noise": 1}])
    assert "'tiny'" in message and words in message


def test_a_wrong_row_length_or_kind_says_what_a_row_is() -> None:
    assert "4, one per column" in refusal([[1, 2, "red"]])
    assert "object keyed by column name" in refusal([5])
    assert "empty" in refusal([])
    with pytest.raises(TooManyInstances):
        validate_rows([[1, 2, "red", 3]] * 3, table(), 2)


def test_null_is_imputed_or_refused_by_the_models_policy() -> None:
    row = {"tiny": None, "huge": None, "colour": None, "noise": 0.5}
    x, _ = validate_rows([row], table("impute"), 10)
    assert np.isnan(x[0, :3]).all() and x[0, 3] == np.float32(0.5)
    message = refusal([row], table("refuse"))
    assert "instances[0]" in message and "'tiny'" in message and "null" in message and "missing=refuse" in message
    assert "'colour'" in refusal([{**row, "tiny": 1, "huge": 2}], table("refuse"))


def test_an_unseen_category_is_counted_or_refused_by_the_models_policy() -> None:
    rows = [[0, 1, "purple", 0], {"tiny": 0, "huge": 1, "colour": "mauve", "noise": 0}, [0, 1, " red ", 0]]
    x, unseen = validate_rows(rows, table(unseen="ignore"), 10)
    assert np.isnan(x[:2, 2]).all() and x[2, 2] == 2  # stripped, as training read the text
    assert unseen == {"colour": 2}
    message = refusal(rows, table(unseen="refuse"))
    assert "instances[0]" in message and "'colour'" in message and "'purple'" in message
    assert "'blue', 'green', 'red'" in message


def test_a_category_sent_as_its_code_is_refused_unless_its_text_is_a_category() -> None:
    message = refusal([[0, 1, 2, 0]])
    assert "'colour'" in message and "as its text" in message
    numeric = TableInput(columns=[{"name": "grade", "type": "category", "categories": ["1", "2", "x"]}])
    x, _ = validate_rows([[2], ["x"], {"grade": 1}], numeric, 10)
    np.testing.assert_array_equal(x[:, 0], [1, 2, 0])


def test_a_long_vocabulary_is_shortened_in_the_message() -> None:
    many = TableInput(columns=[{"name": "city", "type": "category", "categories": [f"c{i:03d}" for i in range(500)]}],
                      unseen_category="refuse")
    message = refusal([["nowhere"]], many)
    assert "(500 in all)" in message and len(message) < 400


def test_numbers_only_bodies_of_a_number_table_take_the_one_step_conversion() -> None:
    numbers = TableInput(columns=[c for c in COLUMNS if c["type"] == "number"])
    rows = [[0.5, 2, 3], [1, 2.5, -3]]
    fast, _ = validate_rows(rows, numbers, 10, numbers_only=True)
    slow, _ = validate_rows(rows, numbers, 10)
    np.testing.assert_array_equal(fast, slow)
    assert "'huge'" in refusal([[0.5, 1e39, 3]], numbers)


# --- v2 tensors ------------------------------------------------------------------------------------


def tensor(data: Any, n: int = 2) -> dict[str, Any]:
    return {"name": "input", "shape": [n, 4], "datatype": "FP32", "data": data}


def test_v2_null_is_an_empty_value_where_the_model_imputes() -> None:
    batch = validate_table_tensor(tensor([0.1, None, 2, 1, 0.2, 3.0, None, 0]), "inputs[0]", "input", table(), 10)
    assert np.isnan(batch[0, 1]) and np.isnan(batch[1, 2]) and batch[1, 1] == 3
    nested = validate_table_tensor(tensor([[0.1, None, 2, 1], [0.2, 3.0, None, 0]]), "inputs[0]", "input", table(), 10)
    np.testing.assert_array_equal(batch, nested)
    binary = validate_table_tensor(tensor(np.array([0.1, np.nan, 2, 1, 0.2, 3, np.nan, 0], np.float32)),
                                   "inputs[0]", "input", table(), 10)
    np.testing.assert_array_equal(batch, binary)
    with pytest.raises(InvalidInstances, match="'huge'"):
        validate_table_tensor(tensor([0.1, None, 2, 1, 0.2, 3.0, 1, 0]), "inputs[0]", "input", table("refuse"), 10)
    with pytest.raises(InvalidInstances, match="'colour'.*category code"):
        validate_table_tensor(tensor([0.1, 1, 3, 1, 0.2, 3.0, 1, 0]), "inputs[0]", "input", table(), 10)


# --- the service, in process, on a real exported table graph --------------------------------------


@pytest.fixture(scope="module")
def table_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_table_model_dir(tmp_path_factory.mktemp("table") / "fluxo-table")


def _requests(model_dir: Path, calls: list[tuple[str, str, Any]]) -> list[Any]:
    import httpx

    from serving import ServingConfig
    from serving.app import create_app
    from serving.server import ModelServer

    service = create_app()
    service.state.server = ModelServer(ServingConfig(model_dir=model_dir, provider="cpu"))

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=service), base_url="http://fluxo") as client:
            return [await (client.get(path) if method == "GET" else client.post(path, json=body))
                    for method, path, body in calls]

    try:
        return asyncio.run(run())
    finally:
        service.state.server.close()


def test_predict_with_objects_and_lists_equals_the_graph_on_the_raw_rows(table_model: Path) -> None:
    from serving.metrics import get_metrics
    from tests.serving_fixtures import onnx_probabilities

    raw = np.array([[0.01, 120.5, 2, -1], [0.0, np.nan, 0, 2.5], [-0.02, 900, np.nan, 0], [0.03, 480, 1, 4]],
                   dtype=np.float32)
    objects = [row_object(r, table()) for r in raw]
    lists = [[obj[c["name"]] for c in COLUMNS] for obj in objects]
    unseen = [{"tiny": 0.0, "huge": 1.0, "colour": "purple", "noise": 0.0}]
    counter = get_metrics().unseen.labels("colour")
    before = counter._value.get()
    by_object, by_list, unknown, refused, metadata, v2_meta, v2 = _requests(table_model, [
        ("POST", "/predict", {"instances": objects}),
        ("POST", "/predict", {"instances": lists}),
        ("POST", "/predict", {"instances": unseen}),
        ("POST", "/predict", {"instances": [{"tiny": "0.1", "huge": 1, "colour": "red", "noise": 0}]}),
        ("GET", "/metadata", None),
        ("GET", "/v2/models/fluxo-table", None),
        ("POST", "/v2/models/fluxo-table/infer",
         {"inputs": [{"name": "input", "shape": [4, 4], "datatype": "FP32",
                      "data": [None if math.isnan(v) else float(v) for v in raw.ravel()]}]}),
    ])
    assert by_object.status_code == 200, by_object.text
    expected = onnx_probabilities(table_model, raw)
    got = np.array([p["probabilities"] for p in by_object.json()["predictions"]])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert len({p["label"] for p in by_object.json()["predictions"]}) > 1  # the rows are told apart
    assert by_list.json() == by_object.json()
    assert unknown.status_code == 200
    np.testing.assert_allclose(unknown.json()["predictions"][0]["probabilities"],
                               onnx_probabilities(table_model, np.array([[0, 1, np.nan, 0]], np.float32))[0],
                               rtol=1e-5, atol=1e-6)
    get_metrics().tally.flush()
    assert counter._value.get() - before == 1
    assert refused.status_code == 400 and "'tiny'" in refused.json()["error"]
    assert "instances[0]" in refused.json()["error"]
    meta = metadata.json()
    assert meta["kind"] == "table" and [c["name"] for c in meta["table"]["columns"]] == [c["name"] for c in COLUMNS]
    assert meta["table"]["columns"][2]["categories"] == ["blue", "green", "red"]
    assert meta["table"]["columns"][1]["median"] == 500.0 and meta["table"]["missing"] == "impute"
    assert meta["columns"][2] == {"name": "colour", "type": "category", "categories": ["blue", "green", "red"]}
    assert v2_meta.json()["parameters"]["table"] == meta["table"]
    assert v2.status_code == 200, v2.text
    probabilities = next(o for o in v2.json()["outputs"] if o["name"] == "probabilities")
    np.testing.assert_allclose(np.array(probabilities["data"]).reshape(4, 3), expected, rtol=1e-5, atol=1e-6)
