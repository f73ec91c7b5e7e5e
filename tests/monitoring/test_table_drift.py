"""Drift on a table model's raw columns, and on a regression model's predicted values.

A real exported table graph (models/preprocess.TableModel: imputation, indicators, one-hot
inside the graph; a few seconds), windows written by the service's own payload logger and
read back by `fluxo monitor`'s read_window, compared by detect.compare on the Samples the
monitor builds. The reference is what load_reference returns for such a model, built from
a seeded sample (load_reference itself needs a DVC data version: tests/monitoring/test_monitor.py).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipelines.monitor.columns import table_tests
from pipelines.monitor.detect import compare, drift_detected, scores
from pipelines.monitor.embedding import Embedder
from pipelines.monitor.mmd import mmd_test
from pipelines.monitor.reference import Reference, table_contract
from pipelines.monitor.report import drift_report
from pipelines.monitor.run import drifted_columns
from pipelines.monitor.signals import Sample
from pipelines.monitor.window import read_window
from serving.payload_log import PayloadLogger

ALPHA = 0.05
CITIES = ["berlin", "lisbon", "oslo", "rome"]
CITY_SHARES = [0.4, 0.3, 0.2, 0.1]
COLUMNS: list[dict[str, Any]] = [
    {"name": "age", "type": "number", "missing": 40, "median": 40.0, "center": 40.0, "scale": 10.0},
    {"name": "income", "type": "number", "missing": 0, "median": 30.0, "center": 33.0, "scale": 15.0},
    {"name": "city", "type": "category", "categories": CITIES, "missing": 20},
    {"name": "score", "type": "number", "missing": 0, "median": 0.5, "center": 0.5, "scale": 0.29},
]
NAMES = [c["name"] for c in COLUMNS]


def rows(n: int, rng: np.random.Generator, *, income: float = 1.0, cities: list[float] = CITY_SHARES,
         age_empty: float = 0.1, score_empty: float = 0.0, city_empty: float = 0.05) -> np.ndarray:
    """``n`` raw rows as the service logs them: numbers (NaN empty), city as its vocabulary index (NaN empty)."""
    x = np.empty((n, len(COLUMNS)), np.float32)
    x[:, 0] = rng.normal(40, 10, n)
    x[:, 1] = rng.lognormal(3.3, 0.5, n) * income
    x[:, 2] = rng.choice(len(CITIES), n, p=cities)
    x[:, 3] = rng.random(n)
    for column, share in ((0, age_empty), (2, city_empty), (3, score_empty)):
        x[rng.random(n) < share, column] = np.nan
    return x


def _export(path: Path, task: str) -> dict[str, Any]:
    import torch

    from models.preprocess import TableInput as Encode
    from models.preprocess import TableModel
    from pipelines.export.onnx_export import export_onnx
    from serving.contract import ModelMetadata

    torch.manual_seed(0)
    regression = task == "regression"
    inner = torch.nn.Linear(Encode(COLUMNS).out_features, 1 if regression else 3)
    target = {"mean": 100.0, "std": 20.0} if regression else None
    export_onnx(TableModel(inner, COLUMNS, target).eval(), (len(COLUMNS),), path / "model.onnx", 18)
    meta = ModelMetadata(model_name=f"fluxo-{task}", architecture="linear", kind="table", task=task,
                         input_shape=[len(COLUMNS)], labels=["price"] if regression else ["low", "mid", "high"],
                         table={"columns": COLUMNS}, onnx_opset=18)
    return meta.model_dump(mode="json")


class Model:
    """An exported table model, its embedder and a reference as load_reference builds it (600 validation rows)."""

    def __init__(self, path: Path, task: str) -> None:
        self.metadata = _export(path, task)
        self.regression = task == "regression"
        self.embedder = Embedder(path / "model.onnx", task=task)
        inputs = rows(600, np.random.default_rng(10))  # a reference typical of its distribution (see the test)
        self.reference = Reference("0123.dir", inputs, self.embedder(inputs), np.zeros(len(inputs)),
                                   table_contract(self.metadata))
        self.log = path / "payloads"
        self.requests = 0

    def window(self, x: np.ndarray) -> Sample:
        """``x`` answered and logged as the service does (10 rows a request), read back as fluxo monitor reads it."""
        seen = self.embedder(x)
        answers = seen.values.reshape(-1, 1) if self.regression else seen.probabilities
        log = PayloadLogger(self.log, start=False)
        model = self.metadata["model_name"]
        for start in range(0, len(x), 10):
            self.requests += 1
            log.record(f"r{self.requests}", "/predict", model, "1", "champion", 1.0, x[start:start + 10],
                       answers[start:start + 10], self.metadata["labels"])
        log.close()
        window = read_window(self.log, model, "1", (len(COLUMNS),), hours=1, max_instances=len(x),
                             now=datetime.now(UTC), regression=self.regression)
        assert len(window) == len(x)
        return Sample.of_window(window, self.embedder(window.inputs), self.reference.table)

    def compare(self, x: np.ndarray) -> dict:
        return compare(Sample.of_reference(self.reference), self.window(x), ALPHA)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Model:
    return Model(tmp_path_factory.mktemp("table-classifier"), "multiclass")


@pytest.fixture(scope="module")
def regressor(tmp_path_factory: pytest.TempPathFactory) -> Model:
    return Model(tmp_path_factory.mktemp("table-regression"), "regression")


def _columns(findings: dict) -> list[str]:
    return drifted_columns(scores(findings))


def _strict_json(findings: dict) -> dict:
    """The summary's scores as the status file and MLflow get them: valid JSON, no NaN anywhere."""
    return json.loads(json.dumps(scores(findings), allow_nan=False))


def test_clean_windows_of_the_same_distribution_raise_no_alarm(classifier: Model) -> None:
    rng = np.random.default_rng(1)
    alarms, named = [], []
    for _ in range(8):
        findings = classifier.compare(rows(300, rng))
        alarms.append(drift_detected(findings))
        named.append(_columns(findings))
    assert sum(alarms) <= 1 and sum(map(bool, named)) <= 1, (alarms, named)
    score = _strict_json(findings)["input"]
    tests = {(c["column"], c["test"]) for c in score["columns"]}
    assert tests == {("age", "values"), ("age", "missing"), ("income", "values"), ("city", "categories"),
                     ("score", "values")}, "no missing test where neither side has an empty cell"
    assert all(0.0 <= c["p_value"] <= 1.0 for c in score["columns"])
    assert list(findings) == ["input", "embedding", "prediction"]


def test_the_column_tests_keep_their_level_over_fresh_samples() -> None:
    """Bonferroni over a table's tests: clean reference/window pairs alarm at most at the signal's level.

    Fresh pairs, because one fixed reference is itself a sample: an unusual one moves every
    window's p-values alike (the fixture's reference is a typical one).
    """
    rng = np.random.default_rng(5)
    contract = table_contract({"kind": "table", "table": {"columns": COLUMNS}})
    results = [table_tests("input", rows(600, rng), rows(300, rng), contract, ALPHA) for _ in range(200)]
    assert np.mean([r.drift for r in results]) <= 0.08
    assert all(r.level == ALPHA and len(r.tests) == 5 for r in results)
    assert all(r.p_value == min(1.0, 5 * min(t.p_value for t in r.tests)) for r in results)


def test_a_shifted_number_column_is_named(classifier: Model) -> None:
    findings = classifier.compare(rows(300, np.random.default_rng(2), income=1.5))
    assert drift_detected(findings) and findings["input"].test.drift
    assert _columns(findings) == ["income"]
    income = next(c for c in _strict_json(findings)["input"]["columns"] if c["column"] == "income")
    assert income["test"] == "values" and income["method"] == "ks" and income["p_value"] < 1e-6
    assert income["window"] > income["reference"] * 1.3, "the medians of the present values"
    report = drift_report({"model": "m", "model_version": "1", "data_version": "d", "alpha": ALPHA,
                           "window": {"start": "s", "end": "e", "instances": 300, "requests": 30},
                           "reference_size": 600, "drift_detected": True, "scores": scores(findings),
                           "drifted_columns": _columns(findings)}, findings, ["low", "mid", "high"])
    assert "drift detected in columns income" in report and "Inputs: the table" in report
    assert "drifted columns: income" in report


def test_changed_category_frequencies_are_drift_in_that_column(classifier: Model) -> None:
    findings = classifier.compare(rows(300, np.random.default_rng(3), cities=[0.1, 0.2, 0.3, 0.4]))
    assert drift_detected(findings)
    assert _columns(findings) == ["city"]
    city = next(c for c in _strict_json(findings)["input"]["columns"] if c["column"] == "city")
    assert city["method"] == "chi2" and city["test"] == "categories"
    assert set(city["reference"]) == {*CITIES, "(empty or unseen)"}


def test_empty_and_unseen_categories_are_a_bucket_of_their_own(classifier: Model) -> None:
    """A city the model never saw arrives as NaN (unseen, ignored by the graph): more of them is drift."""
    findings = classifier.compare(rows(300, np.random.default_rng(4), city_empty=0.35))
    assert _columns(findings) == ["city"]
    city = next(c for c in _strict_json(findings)["input"]["columns"] if c["column"] == "city")
    assert city["window"]["(empty or unseen)"] > 0.25 > city["reference"]["(empty or unseen)"]


@pytest.mark.parametrize(("column", "shift"), [("age", {"age_empty": 0.4}), ("score", {"score_empty": 0.3})])
def test_a_jump_in_a_columns_missing_rate_is_drift(classifier: Model, column: str, shift: dict) -> None:
    """The values still sent look the same; only more cells are empty (score had none in training)."""
    findings = classifier.compare(rows(300, np.random.default_rng(5), **shift))
    assert drift_detected(findings)
    assert _columns(findings) == [column]
    tests = {(c["column"], c["test"]): c for c in _strict_json(findings)["input"]["columns"]}
    assert tests[(column, "missing")]["drift"] and not tests[(column, "values")]["drift"]
    assert tests[(column, "missing")]["method"] == "fisher"


def test_nan_never_reads_as_no_drift(classifier: Model) -> None:
    """A column arriving all empty: every p-value is a number, the column drifts, nothing falls back to p = 1."""
    x = rows(300, np.random.default_rng(6))
    x[:, 1] = np.nan  # income: never empty in training, now always
    findings = classifier.compare(x)
    assert drift_detected(findings) and _columns(findings) == ["income"]
    score = _strict_json(findings)
    assert all(np.isfinite(s["p_value"]) and np.isfinite(s["statistic"]) for s in score.values())
    assert all(np.isfinite(c["p_value"]) for c in score["input"]["columns"])
    # The embedding is the graph's: it imputes the training median, so MMD is fed no NaN.
    assert np.isfinite(classifier.embedder(x).embeddings).all()
    # MMD itself refuses NaN rather than answering p = 1 ...
    rng = np.random.default_rng(7)
    with pytest.raises(ValueError, match="NaN"):
        mmd_test("input", classifier.reference.inputs, x, ALPHA)
    # ... and answers p = 1 only where both sides are truly one constant row.
    assert mmd_test("c", np.ones((50, 2)), np.ones((30, 2)), ALPHA).p_value == 1.0
    moved = mmd_test("c", np.ones((50, 2)), np.full((30, 2), 2.0), ALPHA)
    assert moved.drift and np.isfinite(moved.p_value)
    mostly = mmd_test("c", np.zeros((200, 3)), np.r_[np.zeros((60, 3)), rng.normal(3, 1, (40, 3))], ALPHA)
    assert mostly.drift and np.isfinite(mostly.p_value)


def test_a_regression_models_predicted_values_are_tested_not_probabilities(regressor: Model) -> None:
    assert regressor.embedder.has_head, "the head is found behind the target's rescaling (x * std + mean)"
    clean = regressor.compare(rows(300, np.random.default_rng(8)))
    assert clean["prediction"].reference.shape == (600,) and clean["prediction"].window.shape == (300,)
    np.testing.assert_allclose(clean["prediction"].window.mean(), clean["prediction"].reference.mean(), rtol=0.1)
    assert not clean["prediction"].test.drift
    assert np.isfinite(clean["prediction"].test.p_value) and clean["prediction"].test.p_value > 0.01
    shifted = regressor.compare(rows(300, np.random.default_rng(9), income=2.0))
    assert shifted["prediction"].test.drift and shifted["prediction"].test.p_value < 1e-3
    assert _columns(shifted) == ["income"]
    _strict_json(shifted)
    report = drift_report({"model": "m", "model_version": "1", "data_version": "d", "alpha": ALPHA,
                           "window": {"start": "s", "end": "e", "instances": 300, "requests": 30},
                           "reference_size": 600, "drift_detected": True, "scores": scores(shifted),
                           "drifted_columns": _columns(shifted)}, shifted, ["price"])
    assert "predicted price" in report


def test_a_regression_window_takes_the_value_from_its_records_else_from_the_graph(regressor: Model) -> None:
    """The log's values are the service's answers; a window without them gets the graph's (the same graph)."""
    x = rows(40, np.random.default_rng(10))
    window = regressor.window(x)  # records newest first: the rows in another order
    np.testing.assert_allclose(window.values, regressor.embedder(window.inputs).values, rtol=1e-6)
    np.testing.assert_allclose(np.sort(window.values), np.sort(regressor.embedder(x).values), rtol=1e-6)
    seen = regressor.embedder(x)
    from pipelines.monitor.window import Window

    bare = Window(x, np.zeros((len(x), 0), np.float32), 4, datetime.now(UTC), datetime.now(UTC), None, None)
    np.testing.assert_array_equal(Sample.of_window(bare, seen).values, seen.values)


def test_a_graph_that_does_not_impute_is_fed_the_training_medians(tmp_path: Path) -> None:
    """A table graph whose answer turns NaN on an empty cell (no imputation inside): those rows are embedded
    again with the contract's medians, so the embedding MMD never sees NaN."""
    import onnx
    from onnx import TensorProto, helper

    from serving.contract import INPUT_NAME, OUTPUT_NAME

    weight = np.random.default_rng(0).normal(size=(3, len(COLUMNS))).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", [INPUT_NAME, "w", "b"], [OUTPUT_NAME], transB=1)], "plain",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["n", len(COLUMNS)])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor("w", TensorProto.FLOAT, weight.shape, weight.ravel()),
         helper.make_tensor("b", TensorProto.FLOAT, (3,), np.zeros(3, np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, tmp_path / "plain.onnx")
    contract = table_contract({"kind": "table", "table": {"columns": COLUMNS}})
    x = rows(50, np.random.default_rng(12), age_empty=0.5)
    assert np.isnan(Embedder(tmp_path / "plain.onnx")(x).embeddings).any(), "the graph itself passes NaN on"
    seen = Embedder(tmp_path / "plain.onnx", table=contract)(x)
    assert np.isfinite(seen.embeddings).all() and np.isfinite(seen.probabilities).all()
    filled = x.copy()
    filled[np.isnan(filled[:, 0]), 0] = 40.0  # age's training median
    filled[np.isnan(filled[:, 2]), 2] = -1.0  # an empty city: no category (a code outside the vocabulary)
    np.testing.assert_array_equal(seen.embeddings, filled)  # the head's input: the rows themselves here
    logits = filled @ weight.T
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(seen.probabilities, expected / expected.sum(1, keepdims=True), rtol=1e-4, atol=1e-5)
