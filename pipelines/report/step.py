"""Gather what the model report shows, at export, from what export already holds and the registry.

The candidate is scored by its exported graph on its test split; the champion of the
same name, when there is one with the same input contract, by its own graph on the
same samples (what the gate compares a moment later). A champion that cannot be
scored (another contract, a download that failed) is named with the reason instead,
and the export goes on: the report is a reading aid, never a reason to lose a model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.data.store import Dataset
from pipelines.report.evaluation import RegressionEvaluation, evaluate, evaluate_regression, measure_latency, softmax
from serving.scoring import ParityReport, onnx_logits
from pipelines.report.html import CURVES, ChampionComparison, ReportInputs, write_report
from pipelines.context import RunContext
from serving.contract import REPORT_FILE, ModelMetadata, contract_mismatch

log = logging.getLogger(__name__)

LATENCY_BATCHES = (1, 32)


def served_evaluation(onnx_path: Path, dataset: Dataset, seed: int = 0):
    """The graph's answers on the test split: class probabilities, or for a regression target its values."""
    test = dataset.splits["test"]
    outputs = onnx_logits(onnx_path, test.x, lengths=test.lengths)
    if dataset.task == "regression":
        return evaluate_regression(np.asarray(test.y), outputs, seed=seed)
    return evaluate(np.asarray(test.y), softmax(outputs), len(dataset.labels), seed=seed)


def run_history(client: Any, run_id: str) -> dict[str, list[tuple[int, float]]]:
    history = {}
    for key in CURVES:
        points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if points:
            history[key] = [(int(m.step), float(m.value)) for m in points]
    return history


def champion_comparison(ctx: RunContext, client: Any, metadata: ModelMetadata,
                        dataset: Dataset) -> ChampionComparison | None:
    from mlflow.exceptions import MlflowException

    from pipelines.errors import FluxoError
    from pipelines.registry.store import materialize_version
    from pipelines.registry.versions import CONTRACT_TAG, champion_version

    settings = ctx.settings
    held = champion_version(client, metadata.model_name, settings.tracking.champion_alias)
    if held is None:
        return None
    version = str(held.version)
    if held.run_id == metadata.run_id:
        return ChampionComparison(version, note="it is this model's own run (a re-export of the champion)")
    theirs = json.loads(held.tags[CONTRACT_TAG]) if CONTRACT_TAG in held.tags else None
    mismatch = contract_mismatch(theirs, metadata.input_contract()) if theirs else None
    if mismatch:
        return ChampionComparison(version, note=f"another input contract ({mismatch})")
    try:
        served = materialize_version(ctx, metadata.model_name, version)
        return ChampionComparison(version, served_evaluation(served.onnx_path, dataset, settings.train.seed))
    except (FluxoError, MlflowException, OSError, ValueError) as error:
        log.warning("the report does not compare with champion v%s: %s", version, error)
        return ChampionComparison(version, note=f"it could not be scored ({error})")


def report_step(ctx: RunContext, model_dir: Path, metadata: ModelMetadata, dataset: Dataset,
                parity: ParityReport) -> Path:
    """Write ``report.html`` into the (staged) model directory and log it and its headline numbers to the run."""
    import mlflow

    settings, client = ctx.settings, ctx.client()
    onnx_path = Path(model_dir) / "model.onnx"
    evaluation = served_evaluation(onnx_path, dataset, settings.train.seed)
    test_x = dataset.splits["test"].x
    latency = [measure_latency(onnx_path, test_x, batch) for batch in LATENCY_BATCHES]
    inputs = ReportInputs(
        metadata=metadata, evaluation=evaluation, test_x=test_x, parity=parity, latency=latency,
        split_sizes={name: len(split.y) for name, split in dataset.splits.items()},
        history=run_history(client, str(metadata.run_id)),
        champion=champion_comparison(ctx, client, metadata, dataset),
    )
    path = write_report(Path(model_dir) / REPORT_FILE, inputs)
    if isinstance(evaluation, RegressionEvaluation):
        metrics = {f"report_test_{name}_ci95_{end}": getattr(evaluation.metrics[name], end)
                   for name in ("r2", "mae", "rmse") for end in ("low", "high")}
        metrics = {key: value for key, value in metrics.items() if np.isfinite(value)}
    else:
        accuracy = evaluation.metrics["accuracy"]
        metrics = {"report_test_ece": evaluation.calibration.ece, "report_test_accuracy_ci95_low": accuracy.low,
                   "report_test_accuracy_ci95_high": accuracy.high}
    metrics |= {f"report_latency_ms_batch{lat.batch_size}": lat.median_ms for lat in latency}
    with mlflow.start_run(run_id=str(metadata.run_id)):
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(path), "export")
    return path
