"""Export + parity: a run's best checkpoint → a complete model directory, or nothing at all.

The directory is built in a staging folder beside its target (``model.onnx``, the parity
check on the test split, the int8/fp16 variants export's gate keeps (pipelines/export/variants.py),
``metadata.json``, ``report.html``, last ``checksums.json``: each file's sha256, every file fsynced)
and renamed into place only when parity passes, so
``.fluxo/export/<run id>/`` is always a consistent pair or absent, and a failed check leaves
the previous directory exactly as it was.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.data.store import Dataset, read_dataset
from pipelines.context import RunContext
from pipelines.data.versioning import read_data_version
from pipelines.errors import FluxoError
from pipelines.identity import RunIdentity, fetch_run, run_identity
from pipelines.export.exported import ExportedModel
from pipelines.export.image_recipe import image_recipe, upload_background
from pipelines.export.onnx_export import export_onnx, lengths_graph, servable
from pipelines.export.parity import check_parity
from serving.scoring import ParityReport, served_accuracy
from pipelines.report.step import report_step
from pipelines.export.variants import as_metadata, build_variants, log_decisions
from pipelines.settings import FluxoSettings
from pipelines.train.checkpoint import load_checkpoint, rebuild_model
from models.preprocess import reads_steps
from serving.checksums import seal
from serving.contract import (
    MODEL_FILE, REPORT_FILE, ModelMetadata, Normalization, Preprocessing, TableInput, replace_dir, staging_dir,
    write_metadata,
)
from serving.table_rows import row_object

log = logging.getLogger(__name__)


class ParityFailed(FluxoError):
    """The ONNX graph does not compute what the PyTorch model computes; never retried."""


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
    runs = [run for run in runs if "fluxo.tune.role" not in run.data.tags and "fluxo.kind" not in run.data.tags]
    if not runs:
        raise FluxoError(f"experiment {experiment!r} has no finished run to export; run `fluxo train` first")
    return runs[0].info.run_id


def _checkpoint(root: Path, settings: FluxoSettings, run_id: str, given: Path | None, scratch: Path) -> Path:
    """The run's best checkpoint: the one handed over, the one on local disk, or else from MLflow."""
    if given is not None and Path(given).is_file():
        return Path(given)
    local = Path(root) / settings.train.checkpoint_dir / run_id / "best.pt"
    if local.is_file():
        return local
    import mlflow

    log.info("no local checkpoint for run %s; downloading it from MLflow", run_id)
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/best.pt",
                                                    dst_path=str(scratch)))


def _served_accuracy_if_padded(
    dataset: Dataset, spec: dict[str, Any], onnx_path: Path, test_metrics: dict[str, float],
    lengths: np.ndarray | None = None,
) -> float | None:
    """For variable-length classification data: test accuracy as served, else None.

    ``lengths`` for a graph that takes them (a recurrent model: served exactly as trained);
    without, the graph reads each sequence's zero padding and a loss is warned about.
    """
    if not dataset.manifest.get("variable_length") or spec.get("task", "multiclass") not in ("multiclass", "binary"):
        return None
    test = dataset.splits["test"]
    served = served_accuracy(onnx_path, test.x, np.asarray(test.y), lengths=lengths)
    trained = test_metrics.get("test_accuracy")
    if trained is not None and served < trained - 0.01:
        log.warning(
            "the served %s reads each sequence's zero padding (the ONNX graph takes no lengths): test accuracy "
            "%.4f as trained, %.4f as served; for variable-length data that is served, prefer cnn1d or resnet1d, "
            "or train on sequences padded the way clients will send them",
            spec["architecture"], trained, served,
        )
    return served


def build_metadata(
    spec: dict[str, Any], identity: RunIdentity, test_metrics: dict[str, float], opset: int,
    image: dict[str, Any] | None, parity: ParityReport, served: float | None, upload_background: str | None = None,
    takes_lengths: bool = False, example: list[Any] | None = None,
) -> ModelMetadata:
    """What the service needs beside the ONNX file, from the run's own record (serving/contract.py)."""
    return ModelMetadata(
        model_name=identity.registered_model,
        architecture=spec["architecture"],
        task=spec.get("task", "multiclass"),
        run_id=identity.run_id,
        dataset=identity.dataset,
        kind=spec.get("kind"),
        data_version=identity.data_version,
        input_shape=list(spec["input_shape"]),
        labels=[str(label) for label in spec["labels"]],
        preprocessing=Preprocessing(
            normalize=None if spec.get("kind") == "table" and not reads_steps(spec)
            else Normalization(mean=spec["mean"], std=spec["std"]),
            image=image, upload_background=upload_background),
        table=table_input(spec),
        test_metrics=test_metrics,
        onnx_opset=opset,
        variable_length=served is not None,
        takes_lengths=takes_lengths,
        served_test_accuracy=served,
        parity=parity.as_dict(),
        example_instance=example,
    )


def table_input(spec: dict[str, Any]) -> TableInput | None:
    """A table model's input contract from its spec (columns with training statistics, policies)."""
    return TableInput.model_validate(spec["table"]) if spec.get("kind") == "table" else None


EXAMPLE_MAX_VALUES = 4096
"""Largest instance (in values) kept as the printed example: a 64x64 image still pastes, a photo does not."""


def example_instance(test: Any, table: TableInput | None = None) -> list[Any] | dict[str, Any] | None:
    """The first held-out test instance as a client sends it (raw values, a sequence cut at its own end,
    a table's row as an object keyed by column name).

    ``fluxo serve`` prints it as a ready-to-paste request whatever ``data/`` holds by then.
    """
    if len(test) == 0 or int(np.prod(test.x.shape[1:])) > EXAMPLE_MAX_VALUES:
        return None
    if table is not None:
        return row_object(test.x[0], table)
    instance = np.asarray(test.x[0])
    if test.lengths is not None:
        instance = instance[..., : int(test.lengths[0])]
    return instance.tolist()


def export_model(
    ctx: RunContext, run_id: str | None = None, checkpoint: Path | None = None, dataset: Dataset | None = None,
) -> ExportedModel:
    """Export a run's best model to ``<export_dir>/<run id>/`` after checking it against PyTorch."""
    import mlflow

    root, settings = ctx.root, ctx.settings
    run_id = run_id or latest_run_id(settings.tracking.experiment)
    run = fetch_run(ctx.client(), run_id)
    identity = run_identity(run)
    current = read_data_version(root / f"{settings.data.data_dir}.dvc").md5
    if identity.data_version != current:
        raise FluxoError(
            f"run {run_id} was trained on data version {identity.data_version} but {settings.data.data_dir}/ holds "
            f"{current}; check out the matching data.dvc and run `dvc checkout`, or retrain"
        )
    dataset = dataset or read_dataset(root / settings.data.data_dir)
    target = root / settings.export.export_dir / run_id
    staging = staging_dir(target)
    try:
        model, spec = rebuild_model(load_checkpoint(_checkpoint(root, settings, run_id, checkpoint, staging)))
        with_lengths = lengths_graph(model, bool(dataset.manifest.get("variable_length")))
        task = spec.get("task")
        model = servable(model, task)  # the packed network as trained: the reference parity checks against
        onnx_path = staging / MODEL_FILE
        export_onnx(servable(with_lengths, task) if with_lengths is not None else model, tuple(spec["input_shape"]),
                    onnx_path, settings.export.opset, with_lengths=with_lengths is not None)
        test = dataset.splits["test"]
        lengths = test.lengths if with_lengths is not None else None
        parity = check_parity(model, onnx_path, test.x, settings.export.parity_atol, lengths=lengths)
        test_metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("test_")}
        served = _served_accuracy_if_padded(dataset, spec, onnx_path, test_metrics, lengths)
        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics({"parity_max_abs_diff": parity.max_abs_diff,
                                "parity_argmax_agreement": parity.argmax_agreement})
            mlflow.log_dict(parity.as_dict(), "export/parity.json")
            if served is not None:
                mlflow.log_metric("served_test_accuracy", served)
        if not parity.passed:
            raise ParityFailed(
                f"ONNX parity failed for run {run_id}: max |Δlogit| {parity.max_abs_diff:.2e} "
                f"(allowed export.parity_atol={parity.atol:.0e}), argmax agreement {parity.argmax_agreement:.4f}; "
                f"nothing was registered and {target} is unchanged"
            )
        recipe = image_recipe(dataset.manifest)
        metadata = build_metadata(spec, identity, test_metrics, settings.export.opset, recipe, parity, served,
                                  upload_background(recipe, dataset.splits["train"].x), with_lengths is not None,
                                  example_instance(test, table_input(spec)))
        for leftover in staging.iterdir():  # a downloaded checkpoint is not part of the model directory
            if leftover.name != MODEL_FILE:
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        # Kept variants land in staging beside model.onnx; every decision goes into metadata.json.
        variants = {} if task == "regression" else build_variants(  # judged on accuracy: classifiers only
            staging, dataset, settings.export, takes_lengths=with_lengths is not None, seed=settings.train.seed)
        metadata = metadata.model_copy(update={"variants": as_metadata(variants)})
        if variants:
            with mlflow.start_run(run_id=run_id):
                log_decisions(variants)
        write_metadata(staging, metadata)
        report_step(ctx, staging, metadata, dataset, parity)
        seal(staging)  # last: checksums.json records (and fsyncs) every file, so a torn copy is told apart
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("parity: max |Δlogit| %.2e, argmax agreement %.4f; model directory %s (report: %s)",
             parity.max_abs_diff, parity.argmax_agreement, target, target / REPORT_FILE)
    return ExportedModel(identity, target, metadata, parity)
