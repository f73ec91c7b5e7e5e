"""The MLP baseline beside every run: logged, compared, and a warning when the model does not beat it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.context import open_run
from pipelines.data.ingest import ingest, version
from pipelines.data.store import read_dataset
from pipelines.train.baseline import fit_baseline
from pipelines.train.run import split_statistics, train


def test_the_baseline_learns_digits_and_is_deterministic(project: Path, settings_for) -> None:
    ingest(project, settings_for().data)
    dataset = read_dataset(project / "data")
    mean, std = split_statistics(dataset.splits["train"])
    spec = {"kind": dataset.kind, "mean": mean, "std": std}
    first = fit_baseline(dataset, spec, seed=3, epochs=10)
    assert first.val_score > 0.85 and first.samples == len(dataset.splits["train"].y)
    assert fit_baseline(dataset, spec, seed=3, epochs=10).val_score == first.val_score
    assert first.seconds < 30


def test_a_model_worse_than_the_baseline_is_warned_about_and_tagged(
    project: Path, settings_for, caplog: pytest.LogCaptureFixture
) -> None:
    # A CNN held near chance (one epoch at a learning rate far too small) on data an MLP learns in seconds.
    settings = settings_for("train.epochs=1", "train.learning_rate=1e-6")
    ingest(project, settings.data)
    with caplog.at_level(logging.WARNING, logger="pipelines.train.baseline"):
        result = train(open_run(project, settings), version(project, settings.data))
    run = MlflowClient().get_run(result.run_id)
    assert run.data.metrics["baseline_val_accuracy"] > run.data.metrics["best_val_accuracy"] + 0.3
    assert run.data.tags["fluxo.baseline"] == "worse"
    warning = next(r.getMessage() for r in caplog.records if "baseline" in r.getMessage())
    assert "cnn2d does not beat the MLP baseline" in warning and "--set model.name=mlp" in warning
    assert "the gate will not promote it" in warning


def test_a_model_that_wins_is_tagged_and_the_baseline_can_be_turned_off(project: Path, settings_for) -> None:
    # A CNN given four epochs against a baseline held to one: an MLP reaches 0.47-0.62 validation accuracy on
    # digits after one epoch (seeds 0-3, 42; 0.94-0.96 after ten), this CNN 0.85, so it surely wins.
    settings = settings_for("train.epochs=4", "train.baseline_epochs=1")
    ingest(project, settings.data)
    data_version = version(project, settings.data)
    trained = train(open_run(project, settings), data_version)
    won = MlflowClient().get_run(trained.run_id)  # the client after train(): it set the tracking URI
    metrics = won.data.metrics
    assert metrics["best_val_accuracy"] > metrics["baseline_val_accuracy"] + 0.1, metrics
    assert 0.3 < metrics["baseline_val_accuracy"] < 0.8  # the baseline did run, for its one epoch
    assert won.data.tags["fluxo.baseline"] == "beaten"
    without = train(open_run(project, settings_for("train.epochs=1", "train.baseline_epochs=0")), data_version)
    off = MlflowClient().get_run(without.run_id)
    assert "baseline_val_accuracy" not in off.data.metrics and "fluxo.baseline" not in off.data.tags
