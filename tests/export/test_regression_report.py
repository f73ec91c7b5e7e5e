"""The model report of a regression model: MAE, RMSE and R² (with bootstrap intervals) against
scikit-learn, the page's regression sections, and `fluxo run` on a regression CSV writing it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from pipelines.report.evaluation import (
    Latency,
    RegressionEvaluation,
    evaluate_regression,
    largest_errors,
    regression_intervals,
)
from tests.conftest import store_client

REGRESSION_SECTIONS = ["Model", "Test metrics", "Against the champion", "Predicted against true", "Residuals",
                       "Largest errors", "Learning curves", "Parity", "Latency", "Variants", "Data"]
CLASSIFIER_ONLY = ["Per class", "Confusion matrix", "Calibration", "Most confident mistakes"]


def _noisy(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.normal(150.0, 50.0, n)
    return truth, truth + rng.normal(0.0, 30.0, n)


def test_point_values_are_scikit_learns_and_the_intervals_hold_them() -> None:
    truth, values = _noisy(300)
    intervals = regression_intervals(truth, values, resamples=500)
    expected = {"mae": mean_absolute_error(truth, values), "rmse": float(np.sqrt(mean_squared_error(truth, values))),
                "r2": r2_score(truth, values)}
    for name, value in expected.items():
        interval = intervals[name]
        assert interval.value == pytest.approx(value, rel=1e-12), name
        assert interval.low < value < interval.high, name
    assert 0.5 < intervals["r2"].value < 0.8 and intervals["r2"].high - intervals["r2"].low < 0.2
    small = regression_intervals(*_noisy(40, seed=1), resamples=500)["mae"]
    assert small.high - small.low > intervals["mae"].high - intervals["mae"].low  # fewer samples, wider


def test_edge_cases_constant_truth_and_one_sample() -> None:
    flat = regression_intervals(np.full(20, 3.0), np.full(20, 3.0), resamples=50)
    assert flat["r2"].value == 1.0 and flat["mae"].value == 0.0  # scikit-learn's force_finite answer
    assert regression_intervals(np.full(20, 3.0), np.arange(20.0), resamples=50)["r2"].value == 0.0
    one = regression_intervals(np.array([1.0]), np.array([3.0]))
    assert one["mae"].value == 2.0 and np.isnan(one["r2"].value)


def test_evaluate_regression_reads_the_graphs_column_and_ranks_the_largest_errors() -> None:
    truth = np.array([10.0, 20.0, 30.0, 40.0])
    evaluation = evaluate_regression(truth, np.array([[11.0], [25.0], [30.0], [10.0]], np.float32))
    np.testing.assert_array_equal(evaluation.values, [11.0, 25.0, 30.0, 10.0])
    np.testing.assert_array_equal(evaluation.residuals, [-1.0, -5.0, 0.0, 30.0])
    assert largest_errors(evaluation, limit=2) == [3, 1]


def _inputs(evaluation: RegressionEvaluation, champion: RegressionEvaluation | None = None):
    from pipelines.report.html import ChampionComparison, ReportInputs
    from serving.contract import ModelMetadata
    from serving.scoring import ParityReport

    meta = ModelMetadata(model_name="fluxo-houses", architecture="tabular_mlp", task="regression", kind="table",
                         dataset="houses", input_shape=[4], labels=["price"], run_id="abc",
                         test_metrics={"test_r2": 0.61, "test_mae": 24.0, "test_rmse": 31.0})
    return ReportInputs(
        metadata=meta, evaluation=evaluation, test_x=np.zeros((len(evaluation.truth), 4), np.float32),
        parity=ParityReport(len(evaluation.truth), 3e-5, 1.0, 1e-4), latency=[Latency(1, 0.02, 0.03)],
        split_sizes={"train": 600, "val": 200, "test": len(evaluation.truth)},
        history={"train_loss": [(1, 3.0), (2, 2.0)], "val_loss": [(1, 3.5), (2, 2.5)],
                 "train_accuracy": [(1, 0.0), (2, 0.0)], "val_r2": [(1, 0.3), (2, 0.5)]},
        champion=None if champion is None else ChampionComparison("3", champion, "scored on this split"),
    )


def test_the_page_shows_the_regression_numbers_plots_and_champion_instead_of_classes() -> None:
    from pipelines.report.html import render_report

    truth, values = _noisy(200)
    ours = evaluate_regression(truth, values)
    theirs = evaluate_regression(truth, truth + np.random.default_rng(5).normal(0.0, 45.0, 200))
    page = render_report(_inputs(ours, theirs))
    for section in REGRESSION_SECTIONS:
        assert f"<h2>{section}</h2>" in page, section
    for section in CLASSIFIER_ONLY:
        assert f"<h2>{section}</h2>" not in page, section
    for label in ("MAE", "RMSE", "R²"):
        assert f"<td class=\"l\">{label}" in page, label
    assert f"{ours.metrics['r2'].value:.4g}" in page and f"{ours.metrics['mae'].value:.4g}" in page
    assert "champion v3" in page and "(lower is better)" in page
    champion = page.split("<h2>Against the champion</h2>")[1].split("<h2>")[0]
    assert champion.count('<span class="good">') == 3  # ours is better on all three (30 vs 45 noise)
    assert "argmax" not in page and "accuracy" not in page.split("<h2>Learning curves</h2>")[1].split("<h2>")[0]
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == 3  # scatter, residuals, curves
    assert "units of price" in page and "target price" in page
    alone = render_report(_inputs(ours))
    assert "it is the first of its name" in alone


# Forty seconds of a whole run; the page itself is tested above, and regression export in tests/training/test_tasks.py.
@pytest.mark.slow
def test_fluxo_run_on_a_regression_csv_writes_the_report(project: Path, tmp_path: Path) -> None:
    """The whole pipeline, as a user runs it, on scikit-learn's diabetes table (442 rows, an integer
    target with 214 values: ingest reads it as a regression)."""
    from sklearn.datasets import load_diabetes

    frame = load_diabetes(as_frame=True).frame.rename(columns={"target": "label"})
    frame["label"] = frame["label"].astype(int)
    frame.to_csv(project / "diabetes.csv", index=False)
    stores = project.parent
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    fluxo = str(Path(sys.executable).with_name("fluxo"))
    common = ["--root", str(project), "--set", f"data.dvc_remote={stores / 'dvc-remote'}",
              "--set", f"tracking.tracking_uri=sqlite:///{stores / 'mlflow.db'}"]
    try:
        done = subprocess.run([fluxo, "run", "--set", "data.dataset=diabetes.csv", "--set", "train.epochs=5", *common],
                              capture_output=True, text=True, timeout=540, env=env, cwd=project)
    finally:
        subprocess.run([fluxo, "prefect", "stop", "--root", str(project)], capture_output=True, timeout=60, env=env,
                       cwd=project)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    served = Path(summary["served_dir"])
    metadata = json.loads((served / "metadata.json").read_text())
    assert metadata["task"] == "regression"
    page = (served / "report.html").read_text(encoding="utf-8")
    assert "R²" in page and "<h2>Predicted against true</h2>" in page and "<h2>Residuals</h2>" in page
    assert "<h2>Confusion matrix</h2>" not in page
    metrics = store_client(stores / "mlflow.db").get_run(summary["run_id"]).data.metrics
    assert metrics["report_test_r2_ci95_low"] <= metrics["report_test_r2_ci95_high"]
    assert metrics["report_test_mae_ci95_low"] <= summary["test_metrics"]["test_mae"] + 1e-3
    assert summary["test_metrics"]["test_mae"] - 1e-3 <= metrics["report_test_mae_ci95_high"]
