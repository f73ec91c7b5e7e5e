"""The last ``fluxo monitor`` verdict as Prometheus gauges on the service's ``/metrics``.

``fluxo monitor`` runs elsewhere (a scheduled flow) and writes its summary to a JSON
file (pipelines/monitor/run.py, replaced atomically); ``FLUXO_DRIFT_STATUS`` names that
file, and each worker re-reads it when its modification time changes. A file keeps
``serving`` free of MLflow and Prefect, like the model pointer (serving/reload.py).

- ``fluxo_drift_detected{model_name, model_version}``: 1 drift, 0 none, -1 no decision;
- ``fluxo_drift_p_value{model_name, model_version, signal}`` and
  ``fluxo_drift_statistic{...}``: per signal, each name in the summary's ``scores``
  (the signals are listed in pipelines/monitor/signals/);
- ``fluxo_drift_window_instances{model_name, model_version}``;
- ``fluxo_drift_checked_timestamp_seconds``: when the verdict was written (alert on staleness).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class DriftGauges:
    """The ``fluxo_drift_*`` gauges of this process, set from the status file."""

    def __init__(self) -> None:
        from prometheus_client import Gauge

        labels = ["model_name", "model_version"]
        self.detected = Gauge("fluxo_drift_detected", "Last drift verdict: 1 drift, 0 none, -1 no decision",
                              labels, multiprocess_mode="max")
        self.p_value = Gauge("fluxo_drift_p_value", "Last drift test p-value per signal", [*labels, "signal"],
                             multiprocess_mode="max")
        self.statistic = Gauge("fluxo_drift_statistic", "Last drift test MMD statistic per signal",
                               [*labels, "signal"], multiprocess_mode="max")
        self.instances = Gauge("fluxo_drift_window_instances", "Instances in the last drift window", labels,
                               multiprocess_mode="max")
        self.checked = Gauge("fluxo_drift_checked_timestamp_seconds", "When the last drift verdict was written",
                             multiprocess_mode="max")


class DriftStatus:
    """Watches one status file; :meth:`refresh` is cheap when it has not changed (one ``stat``)."""

    def __init__(self, path: Path | str, gauges: DriftGauges | None = None) -> None:
        self.path = Path(path)
        self.gauges = gauges or _gauges()
        self._seen: float | None = None
        self.summary: dict[str, Any] | None = None

    def refresh(self) -> bool:
        """Re-read the file if it changed; True when the gauges were updated."""
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return False
        if mtime == self._seen:
            return False
        try:
            summary = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            logger.warning("drift status %s unreadable (%s); keeping the last verdict", self.path, error)
            return False
        self._seen, self.summary = mtime, summary
        self._set(summary)
        return True

    def _set(self, summary: dict[str, Any]) -> None:
        name, version = str(summary.get("model")), str(summary.get("model_version"))
        detected = summary.get("drift_detected")
        self.gauges.detected.labels(name, version).set(-1 if detected is None else int(bool(detected)))
        for signal, score in (summary.get("scores") or {}).items():
            self.gauges.p_value.labels(name, version, signal).set(float(score["p_value"]))
            self.gauges.statistic.labels(name, version, signal).set(float(score["statistic"]))
        self.gauges.instances.labels(name, version).set(float((summary.get("window") or {}).get("instances", 0)))
        checked = summary.get("checked_at")
        if checked:
            self.gauges.checked.set(datetime.fromisoformat(checked).timestamp())


_drift_gauges: DriftGauges | None = None


def _gauges() -> DriftGauges:
    global _drift_gauges
    if _drift_gauges is None:
        _drift_gauges = DriftGauges()
    return _drift_gauges
