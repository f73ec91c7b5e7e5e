"""Prefect flows: they only call the plain step functions, in order, handing each the last one's result.

Prefect uses its embedded server unless ``PREFECT_API_URL`` points at a real one. Steps
that are safe to repeat retry, and only for transient faults (pipelines/retry.py): a
user's mistake fails the run at once, as one line, without a traceback.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipelines.context import RunContext, open_run
from pipelines.fingerprint import run_fingerprint
from pipelines.release import ExportResult, ReleaseSteps, export_run, plain_steps
from pipelines.retry import is_user_error, retry_transient_only
from pipelines.settings import load_settings

# Each task imports its step when it runs: an unchanged rerun, whose training and export come
# from Prefect's cache, never loads torch, ONNX or the report's plotting.
if TYPE_CHECKING:
    from pipelines.data.ingest import Ingested
    from pipelines.export.exported import ExportedModel
    from pipelines.train.result import TrainResult

log = logging.getLogger(__name__)

# Retried only when retry_transient_only says the fault may pass; training is deterministic and
# export is local, so they never retry.
TRANSIENT_RETRIES = {"retries": 2, "retry_delay_seconds": 1, "retry_condition_fn": retry_transient_only}


def _by_fingerprint(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect cache key: the task and the run's fingerprint (data version, settings, code)."""
    return f"{context.task.name}-{parameters['fingerprint']}"


# Training and export are pure functions of the fingerprint: an unchanged run reuses their
# persisted results (Prefect's cache) instead of training a copy of the champion.
CACHED = {"cache_key_fn": _by_fingerprint, "persist_result": True}


@task(name="ingest", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def ingest_task(ctx: RunContext) -> Ingested:
    from pipelines.data.ingest import ingest

    return ingest(ctx.root, ctx.settings.data, ctx.settings.model.name)


@task(name="push-data", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def push_task(ctx: RunContext) -> int:
    from pipelines.data.ingest import push

    return push(ctx.root, ctx.settings.data)


@task(name="train-evaluate", **CACHED)
def train_task(ctx: RunContext, ingested: Ingested, fingerprint: str) -> TrainResult:
    from pipelines.train.run import train

    return train(ctx, ingested.version)


@task(name="export-parity", **CACHED)
def export_task(ctx: RunContext, trained: TrainResult, fingerprint: str) -> ExportedModel:
    from pipelines.export.package import export_model

    return export_model(ctx, trained.run_id, trained.checkpoint)


def summarize(ingested: Ingested, pushed: int, trained: TrainResult, exported: ExportResult) -> dict[str, Any]:
    return {
        "data_version": ingested.version.md5,
        "data_pushed_objects": pushed,
        "run_id": trained.run_id,
        "test_metrics": trained.test_metrics,
        "train_seconds": round(trained.seconds, 2),
        "registered_model": exported.registered_model,
        "model_version": exported.model_version,
        "promoted": exported.promotion.promoted,
        "alias": exported.promotion.alias,
        "promotion": exported.promotion.reason,
        "parity_max_abs_diff": exported.parity.max_abs_diff,
        "export_dir": str(exported.export_dir),
        "served_dir": str(exported.served_dir) if exported.served_dir else None,
    }


class UserErrorTraceFilter(logging.Filter):
    """Drops the traceback from Prefect's log records of a user's mistake (kept with ``--verbose``).

    Prefect logs every failed task and flow with ``exc_info``; for a ``FluxoError`` that is
    dozens of lines around the one that matters, which the CLI prints as ``error: ...``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and is_user_error(error) and not logging.getLogger().isEnabledFor(logging.DEBUG):
            record.exc_info, record.exc_text = None, None
        return True


class ShutdownRaceFilter(logging.Filter):
    """Drops Prefect's traceback for an event sent after its event service stopped (kept with ``--verbose``).

    A flow that fails within a second can end while the flow-run heartbeat thread sends
    its first event; Prefect then logs "Error emitting event" with a traceback of its own
    shutdown, which says nothing about the run.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        stopped = isinstance(error, RuntimeError) and "stopped service instance" in str(error)
        return not stopped or logging.getLogger().isEnabledFor(logging.DEBUG)


def _add_filter(name: str, kind: type[logging.Filter]) -> None:
    logger = logging.getLogger(name)
    if not any(isinstance(f, kind) for f in logger.filters):
        logger.addFilter(kind())


def quiet_user_errors() -> None:
    """Install the filters above on Prefect's loggers (idempotent)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        _add_filter(name, UserErrorTraceFilter)
    _add_filter("prefect.events.utilities", ShutdownRaceFilter)


def _still_tracked(ctx: RunContext, run_id: str) -> bool:
    """A cached training result is only reusable while its MLflow run still exists."""
    from mlflow.exceptions import MlflowException

    try:
        return ctx.client().get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def summarize_unchanged(ctx: RunContext, ingested: Ingested, pushed: int, trained: TrainResult,
                        released: ExportResult) -> dict[str, Any]:
    """An unchanged run moves no alias: it says which run it equals and who stays champion."""
    from pipelines.registry.versions import champion_version

    held = champion_version(ctx.client(), released.registered_model, ctx.settings.tracking.champion_alias)
    champion = f"champion v{held.version} stays" if held is not None else "there is no champion yet"
    message = f"unchanged since run {trained.run_id} (same data version, settings and code); {champion}"
    log.info(message)
    return {
        "unchanged": True,
        "data_version": ingested.version.md5,
        "data_pushed_objects": pushed,
        "run_id": trained.run_id,
        "test_metrics": trained.test_metrics,
        "registered_model": released.registered_model,
        "model_version": released.model_version,
        "champion_version": None if held is None else str(held.version),
        "promoted": False,
        "alias": None,
        "promotion": message,
    }


def release_tasks(trained: TrainResult, fingerprint: str, refresh_export: bool) -> ReleaseSteps:
    """pipelines/release.py's steps, each as this flow's task named after it: export cached by the run's
    fingerprint, every later step retried on transient faults. A step added there is a task here unasked."""

    def export(ctx: RunContext, run_id: str | None, checkpoint: Path | None) -> ExportedModel:
        return export_task.with_options(refresh_cache=refresh_export or None)(ctx, trained, fingerprint)

    plain = plain_steps()
    retried = {step.name: task(getattr(plain, step.name), name=step.name, cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
               for step in fields(plain) if step.name != "export"}
    return ReleaseSteps(export=export, **retried)


def flow_context(config: str | None, overrides: list[str] | None, root: str) -> RunContext:
    """A flow run's context, built once from its own parameters (a deployment's worker has nothing else)."""
    quiet_user_errors()
    return open_run(Path(root), load_settings(Path(config) if config else None, overrides or []))


@flow(name="fluxo-pipeline", log_prints=False)
def pipeline_flow(
    config: str | None = None, overrides: list[str] | None = None, root: str = ".", force: bool = False
) -> dict[str, Any]:
    """ingest → push → train + evaluate → export + parity → register → gate → promote → publish.

    A run whose data version, settings and code equal an earlier successful run's reuses its
    training and export (Prefect's cache) and moves no alias; ``force`` retrains.
    """
    ctx = flow_context(config, overrides, root)
    ingested = ingest_task(ctx)
    pushed = push_task(ctx)
    fingerprint = run_fingerprint(ctx.root, ctx.settings, ingested.version.md5, ctx.tracking_uri)
    state = train_task.with_options(refresh_cache=force or None)(ctx, ingested, fingerprint, return_state=True)
    trained, reused = state.result(), state.name == "Cached"
    if reused and not _still_tracked(ctx, trained.run_id):
        log.info("the cached run %s is gone from MLflow; training again", trained.run_id)
        trained, reused = train_task.with_options(refresh_cache=True)(ctx, ingested, fingerprint), False
    steps = release_tasks(trained, fingerprint, refresh_export=force or not reused)
    released = export_run(ctx, trained.run_id, trained.checkpoint, steps=steps, reused=reused)
    if released.unchanged:
        return summarize_unchanged(ctx, ingested, pushed, trained, released)
    return {"unchanged": False, **summarize(ingested, pushed, trained, released)}


@task(name="drift-check", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def drift_task(ctx: RunContext, model: str | None, name: str, window_hours: float | None) -> dict[str, Any]:
    from pipelines.monitor.run import monitor

    return monitor(ctx, model, name, window_hours).summary


@flow(name="fluxo-monitor", log_prints=False)
def monitor_flow(config: str | None = None, overrides: list[str] | None = None, root: str = ".",
                 model: str | None = None, name: str | None = None,
                 window_hours: float | None = None) -> dict[str, Any]:
    """Payload window vs the model's reference; on drift, the ``fluxo.drift.detected`` event a trigger can act on."""
    from pipelines.monitor.events import emit_drift_event

    ctx = flow_context(config, overrides, root)
    summary = drift_task(ctx, model, name or ctx.settings.registered_model_name(), window_hours)
    if summary["drift_detected"]:
        summary["event_id"] = emit_drift_event(summary)
    return summary


def _parameters(config: str | None, overrides: list[str], root: str) -> dict[str, Any]:
    return {"config": config, "overrides": overrides, "root": str(Path(root).resolve())}


def scheduled_deployment(cron: str | None, config: str | None, overrides: list[str], root: str, name: str,
                         retrain_on_drift: str | None = None):
    """The pipeline as a Prefect deployment that runs on ``cron`` (if given) with these parameters.

    ``retrain_on_drift`` (a registered model name) adds a trigger: each drift event of
    that model starts one pipeline run. A scheduled retrain starts from the champion's
    weights when they fit (``train.init_from=champion``) unless the preset or an override
    says otherwise (``train.init_from=scratch``).
    """
    from pipelines.monitor.events import retrain_trigger
    from pipelines.settings import load_settings

    if load_settings(Path(config) if config else None, overrides).train.init_from is None:
        overrides = [*overrides, "train.init_from=champion"]
    parameters = {**_parameters(config, overrides, root), "force": False}
    triggers = [retrain_trigger(retrain_on_drift, parameters)] if retrain_on_drift else None
    return pipeline_flow.to_deployment(name=name, cron=cron, parameters=parameters, triggers=triggers)


def monitor_deployment(cron: str, config: str | None, overrides: list[str], root: str, name: str,
                       model_name: str | None):
    """``fluxo monitor`` as a Prefect deployment on ``cron`` (``model_name`` None: the settings' registered name)."""
    return monitor_flow.to_deployment(name=f"{name}-monitor", cron=cron,
                                      parameters={**_parameters(config, overrides, root), "name": model_name})
