"""Prefect flows: they only call the plain step functions, in order.

Prefect uses its embedded server unless ``PREFECT_API_URL`` points at a real one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipelines.settings import FluxoSettings, load_settings
from pipelines.data.ingest import ingest, version
from pipelines.data.versioning import DataVersion
from pipelines.export.step import ExportResult, export_run
from pipelines.train.run import TrainResult, train

# Steps that touch the file system or a remote get retries; training is deterministic, so a
# retry would only repeat a real failure.
IO_RETRIES = {"retries": 2, "retry_delay_seconds": 2}


@task(name="ingest", cache_policy=NO_CACHE, **IO_RETRIES)
def ingest_task(root: Path, settings: FluxoSettings) -> Path:
    return ingest(root, settings.data)


@task(name="version", cache_policy=NO_CACHE, **IO_RETRIES)
def version_task(root: Path, settings: FluxoSettings) -> DataVersion:
    return version(root, settings.data)


@task(name="train-evaluate", cache_policy=NO_CACHE)
def train_task(root: Path, settings: FluxoSettings, data_version: DataVersion) -> TrainResult:
    return train(root, settings, data_version)


@task(name="export-register", cache_policy=NO_CACHE, **IO_RETRIES)
def export_task(root: Path, settings: FluxoSettings, run_id: str) -> ExportResult:
    return export_run(root, settings, run_id)


def summarize(data_version: DataVersion, trained: TrainResult, exported: ExportResult) -> dict[str, Any]:
    return {
        "data_version": data_version.md5,
        "run_id": trained.run_id,
        "test_metrics": trained.test_metrics,
        "train_seconds": round(trained.seconds, 2),
        "registered_model": exported.registered_model,
        "model_version": exported.model_version,
        "promoted": exported.promotion.promoted,
        "promotion": exported.promotion.reason,
        "parity_max_abs_diff": exported.parity.max_abs_diff,
        "export_dir": str(exported.export_dir),
    }


@flow(name="fluxo-pipeline", log_prints=False)
def pipeline_flow(config: str | None = None, overrides: list[str] | None = None, root: str = ".") -> dict[str, Any]:
    """ingest → version → train + evaluate → export + parity → register + promote."""
    project = Path(root).resolve()
    settings = load_settings(Path(config) if config else None, overrides or [])
    ingest_task(project, settings)
    data_version = version_task(project, settings)
    trained = train_task(project, settings, data_version)
    exported = export_task(project, settings, trained.run_id)
    return summarize(data_version, trained, exported)


def scheduled_deployment(cron: str, config: str | None, overrides: list[str], root: str, name: str):
    """The pipeline as a Prefect deployment that runs on ``cron`` with these parameters."""
    return pipeline_flow.to_deployment(
        name=name,
        cron=cron,
        parameters={"config": config, "overrides": overrides, "root": str(Path(root).resolve())},
    )


def serve_on_schedule(cron: str, config: str | None, overrides: list[str], root: str, name: str) -> None:
    """Register the deployment and execute its scheduled runs in this process until stopped."""
    from prefect import serve

    serve(scheduled_deployment(cron, config, overrides, root, name))
