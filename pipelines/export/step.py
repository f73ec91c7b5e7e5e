"""The export step: a run's best checkpoint → ONNX → parity check → registry → maybe champion."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.settings import FluxoSettings
from pipelines.data.store import read_dataset
from pipelines.data.versioning import read_data_version
from pipelines.errors import FluxoError
from pipelines.export.image_recipe import image_recipe
from pipelines.export.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx, servable
from pipelines.export.parity import ParityReport, check_parity, served_accuracy
from pipelines.export.registry import PromotionDecision, promote_if_better
from pipelines.tracking import configure_mlflow
from pipelines.train.checkpoint import load_checkpoint, rebuild_model

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"


@dataclass
class ExportResult:
    run_id: str
    export_dir: Path
    parity: ParityReport
    registered_model: str
    model_version: str
    promotion: PromotionDecision


def latest_run_id(experiment: str) -> str:
    """The newest finished training run of the experiment (tuning trials excluded)."""
    import mlflow

    runs = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string="attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=200,
        output_format="list",
    )
    # Tuning studies and their trials are not what a user means by "the newest run".
    runs = [run for run in runs if "fluxo.tune.role" not in run.data.tags]
    if not runs:
        raise FluxoError(f"experiment {experiment!r} has no finished run to export; run `fluxo train` first")
    return runs[0].info.run_id


def build_metadata(
    spec: dict[str, Any],
    run: Any,
    name: str,
    test_metrics: dict[str, float],
    opset: int,
    image: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What the service needs beside the ONNX file (see serving/README.md)."""
    preprocessing: dict[str, Any] = {"normalize": {"mean": spec["mean"], "std": spec["std"]}, "in_graph": True}
    if image is not None:
        preprocessing["image"] = image
    return {
        "model_name": name,
        "model_version": None,
        "architecture": spec["architecture"],
        "task": spec.get("task", "multiclass"),
        "run_id": run.info.run_id,
        "dataset": spec["dataset"],
        "data_version": run.data.tags.get("data_version"),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_shape": list(spec["input_shape"]),
        "input_dtype": "float32",
        "labels": list(spec["labels"]),
        "preprocessing": preprocessing,
        "test_metrics": test_metrics,
        "onnx_opset": opset,
    }


def _served_accuracy_if_padded(
    dataset: Any, spec: dict[str, Any], onnx_path: Path, test_metrics: dict[str, float]
) -> float | None:
    """For variable-length classification data: test accuracy as served (padded, no lengths), else None."""
    if not dataset.manifest.get("variable_length") or spec.get("task", "multiclass") not in ("multiclass", "binary"):
        return None
    test = dataset.splits["test"]
    served = served_accuracy(onnx_path, test.x, np.asarray(test.y))
    trained = test_metrics.get("test_accuracy")
    if trained is not None and served < trained - 0.01:
        log.warning(
            "the served %s reads each sequence's zero padding (the ONNX graph takes no lengths): test accuracy "
            "%.4f as trained, %.4f as served; for variable-length data that is served, prefer cnn1d or resnet1d, "
            "or train on sequences padded the way clients will send them",
            spec["architecture"], trained, served,
        )
    return served


def export_run(root: Path, settings: FluxoSettings, run_id: str | None = None) -> ExportResult:
    """Export a run's best model, check it against PyTorch, register it and decide promotion."""
    import mlflow
    import mlflow.onnx
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    root = Path(root)
    configure_mlflow(root, settings)
    client = MlflowClient()
    run_id = run_id or latest_run_id(settings.tracking.experiment)
    run = client.get_run(run_id)

    current = read_data_version(root / f"{settings.data.data_dir}.dvc").md5
    trained_on = run.data.tags.get("data_version")
    if trained_on != current:
        raise FluxoError(
            f"run {run_id} was trained on data version {trained_on} but {settings.data.data_dir}/ holds {current}; "
            "check out the matching data.dvc and run `dvc checkout`, or retrain"
        )
    with tempfile.TemporaryDirectory() as scratch:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/best.pt", dst_path=scratch)
        model, spec = rebuild_model(load_checkpoint(Path(local)))
    model = servable(model, spec.get("task"))

    export_dir = root / settings.export.export_dir
    onnx_path = export_dir / MODEL_FILE
    proto = export_onnx(model, tuple(spec["input_shape"]), onnx_path, settings.export.opset)

    dataset = read_dataset(root / settings.data.data_dir)
    test = dataset.splits["test"]
    parity = check_parity(model, onnx_path, test.x, settings.export.parity_atol)
    name = settings.registered_model_name()
    test_metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("test_")}
    metadata = build_metadata(
        spec, run, name, test_metrics, settings.export.opset, image=image_recipe(dataset.manifest)
    )
    served = _served_accuracy_if_padded(dataset, spec, onnx_path, test_metrics)
    if served is not None:
        metadata["variable_length"] = True
        metadata["served_test_accuracy"] = served

    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({"parity_max_abs_diff": parity.max_abs_diff, "parity_argmax_agreement": parity.argmax_agreement})
        mlflow.log_dict(parity.as_dict(), "export/parity.json")
        if served is not None:
            mlflow.log_metric("served_test_accuracy", served)
        if not parity.passed:
            raise FluxoError(
                f"ONNX parity failed for run {run_id}: max |Δlogit| {parity.max_abs_diff:.2e} "
                f"(allowed {parity.atol:.0e}), argmax agreement {parity.argmax_agreement:.4f}; "
                "the model was not registered"
            )
        sample = np.ascontiguousarray(test.x[:2], dtype=np.float32)
        import onnxruntime as ort

        logits = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: sample})[0]
        info = mlflow.onnx.log_model(
            proto,
            name="model",
            registered_model_name=name,
            signature=infer_signature(sample, logits),
            metadata=metadata,
            pip_requirements=["onnx", "onnxruntime"],
            save_as_external_data=False,
        )
    version = str(info.registered_model_version)
    metadata["model_version"] = version
    (export_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    promotion = promote_if_better(
        client, name, version, run_id, settings.tracking.champion_metric, settings.tracking.champion_alias
    )
    log.info("parity: max |Δlogit| %.2e, argmax agreement %.4f", parity.max_abs_diff, parity.argmax_agreement)
    if promotion.promoted:
        from pipelines.serve import publish_champion  # imports this module: import late

        publish_champion(root, settings)  # servers started by `fluxo serve` reload it within seconds
    return ExportResult(run_id, export_dir, parity, name, version, promotion)
