"""``fluxo monitor``: does what the live model sees still look like what it was trained for?

The newest window of the payload log (the instances one model version answered) is
compared with validation samples of the data version that version was trained on, on
each drift signal in use (pipelines/monitor/signals/; the verdict: detect.py). The result
is an MLflow run (metrics, the HTML report, the summary), a status file the service turns
into Prometheus gauges (``fluxo_drift_*``), and, from the Prefect flow, an event that can
trigger retraining.
"""

from __future__ import annotations

import logging
import re
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pipelines.cluster import ray_cluster
from pipelines.errors import FluxoError
from pipelines.monitor.detect import compare, scores
from pipelines.monitor.embedding import Embedder
from pipelines.monitor.on_cluster import newest_on_cluster
from pipelines.monitor.reference import load_reference, table_contract
from pipelines.monitor.report import drift_report
from pipelines.monitor.signals import Sample
from pipelines.monitor.status import write_status
from pipelines.monitor.window import read_window
from pipelines.context import RunContext
from pipelines.settings import FluxoSettings

log = logging.getLogger(__name__)

KIND_TAG = "fluxo.kind"
KIND = "drift-monitor"


def payload_dir(root: Path, settings: FluxoSettings, served_at: str | None = None) -> Path | str:
    """The payload log to read: a local directory (relative ones under the root) or an ``s3://`` URL.

    ``served_at``: the server the model was chosen from, named when it writes no log.
    """
    configured = settings.monitor.payload_log or settings.serve.payload_log_under(root)
    if not configured and served_at:
        raise FluxoError(f"the server at {served_at} writes no payload log, so there is nothing to monitor: start it "
                         "with --set serve.payload_log=.fluxo/payloads (or set monitor.payload_log to a log "
                         "another server writes)")
    if not configured:
        raise FluxoError("no payload log to monitor: set serve.payload_log (where the service writes, e.g. "
                         "--set serve.payload_log=.fluxo/payloads) or monitor.payload_log")
    if "://" in configured:
        if not configured.startswith("s3://"):
            raise FluxoError(f"payload log {configured!r}: fluxo reads a local directory or an s3:// URL")
        return configured
    path = Path(configured)
    return path if path.is_absolute() else Path(root) / path  # monitor.payload_log, like serve's, under the root


@dataclass
class MonitorResult:
    summary: dict[str, Any]
    report_html: str | None


def monitor(ctx: RunContext, model: str | None, name: str, window_hours: float | None = None,
            now: datetime | None = None, record: bool = True) -> MonitorResult:
    """Test the window against the reference; record it (MLflow, status file) unless ``record`` is False."""
    from pipelines.registry.store import materialize_model

    root, settings = ctx.root, ctx.settings
    hours = window_hours if window_hours is not None else settings.monitor.window_hours
    if hours <= 0:
        raise FluxoError(f"--window-hours {hours}: must be above 0")
    served = materialize_model(ctx, model, name)
    metadata = served.as_dict()
    model_name, version = str(metadata["model_name"]), served.version
    shape = tuple(int(s) for s in metadata["input_shape"])
    regression = metadata.get("task") == "regression"
    window = _read(payload_dir(root, settings), settings, model_name, version, shape, hours, now, regression)
    summary: dict[str, Any] = {
        "model": model_name, "model_version": version, "data_version": metadata.get("data_version"),
        "alpha": settings.monitor.alpha, "window": window.as_dict(), "reference_size": 0,
        "drift_detected": None, "scores": {},
    }
    if len(window) < settings.monitor.min_instances:
        summary["reason"] = (f"{len(window)} instances of {model_name} v{version} logged in the last {hours:g} h; "
                             f"at least monitor.min_instances={settings.monitor.min_instances} are needed to test")
        log.warning(summary["reason"])
        if record:
            write_status(root, model_name, summary)
        return MonitorResult(summary, None)
    embedder = Embedder(served.onnx_path, task=metadata.get("task"), table=table_contract(metadata))
    reference = load_reference(root, settings, metadata, embedder)
    findings = compare(Sample.of_reference(reference),
                       Sample.of_window(window, embedder(window.inputs), reference.table), settings.monitor.alpha)
    tests = [finding.test for finding in findings.values()]
    summary["reference_size"] = len(reference.inputs)
    summary["scores"] = scores(findings)
    summary["drift_detected"] = any(test.drift for test in tests)
    summary["embedding"] = "head input" if embedder.has_head else "logits"
    if reference.table is not None:  # by name, from the table's column tests (pipelines/monitor/columns.py)
        summary["drifted_columns"] = drifted_columns(summary["scores"])
    report = drift_report(summary, findings, list(metadata["labels"]))
    verdict = "DRIFT" if summary["drift_detected"] else "no drift"
    log.info("%s v%s: %s over %d instances (p-values %s; level %.3g each)%s", model_name, version, verdict,
             len(window), ", ".join(f"{t.signal} {t.p_value:.3g}" for t in tests), tests[0].level,
             f"; drifted columns: {', '.join(summary['drifted_columns'])}" if summary.get("drifted_columns") else "")
    if record:
        summary["mlflow_run_id"] = _record(root, settings, summary, report)
        write_status(root, model_name, summary)
    return MonitorResult(summary, report)


def _read(location: Path | str, settings: FluxoSettings, model_name: str, version: str | None,
          shape: tuple[int, ...], hours: float, now: datetime | None, regression: bool) -> Any:
    """The window, read by this process or, with ``cluster.address`` set, by the cluster's tasks."""
    spread = settings.cluster.enabled
    with ray_cluster(settings.cluster) if spread else nullcontext():
        return read_window(location, model_name, version, shape, hours, settings.monitor.max_instances, now,
                           regression=regression, reader=newest_on_cluster if spread else None)


def drifted_columns(scores: dict[str, dict[str, Any]]) -> list[str]:
    """The table columns any signal found drifted, in the order first named."""
    names = (name for score in scores.values() for name in score.get("drifted_columns", ()))
    return list(dict.fromkeys(names))


def _metric_name(text: str) -> str:
    """``text`` as MLflow allows in a metric name (letters, digits, ``_ - . /`` and spaces)."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", text)


def _record(root: Path, settings: FluxoSettings, summary: dict[str, Any], report: str) -> str:
    """One MLflow run tagged ``fluxo.kind=drift-monitor``: parameters, scores, the report and the summary."""
    import mlflow

    tags = {KIND_TAG: KIND, "fluxo.drift_detected": str(summary["drift_detected"]).lower()}
    with mlflow.start_run(run_name=f"monitor-{summary['model']}-v{summary['model_version']}", tags=tags) as run:
        mlflow.log_params({
            "model_name": summary["model"], "model_version": summary["model_version"],
            "data_version": summary["data_version"], "window_start": summary["window"]["start"],
            "window_end": summary["window"]["end"], "alpha": summary["alpha"],
            "reference_size": summary["reference_size"],
        })
        metrics = {"window_instances": summary["window"]["instances"], "window_requests": summary["window"]["requests"],
                   "drift_detected": float(bool(summary["drift_detected"]))}
        for signal, score in summary["scores"].items():
            metrics[f"drift_{signal}_statistic"] = score["statistic"]
            metrics[f"drift_{signal}_p_value"] = score["p_value"]
            for column in score.get("columns", ()):  # a table's column tests, each by name
                metrics[_metric_name(f"drift_{signal}_{column['column']}_{column['test']}_p_value")] = column["p_value"]
        mlflow.log_metrics(metrics)
        mlflow.log_text(report, "drift_report.html")
        mlflow.log_dict(summary, "drift_summary.json")
    return run.info.run_id
