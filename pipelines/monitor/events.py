"""The Prefect event a drift alarm sends, and the deployment trigger that turns it into a retraining run.

The event names the model as its resource, so a trigger can follow one model; its
payload is the monitor's summary (window, scores), shown in Prefect's event feed.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

DRIFT_EVENT = "fluxo.drift.detected"


def model_resource(name: str) -> str:
    return f"fluxo.model.{name}"


def emit_drift_event(summary: dict[str, Any]) -> str | None:
    """Send ``fluxo.drift.detected`` for ``summary['model']``; the event's id, or None if events are off."""
    from prefect.events import emit_event

    event = emit_event(
        event=DRIFT_EVENT,
        resource={"prefect.resource.id": model_resource(summary["model"]),
                  "prefect.resource.name": summary["model"],
                  "fluxo.model-version": str(summary["model_version"])},
        payload={key: summary[key] for key in ("model", "model_version", "data_version", "window", "scores")},
    )
    if event is None:
        return None
    log.info("sent %s for %s v%s (event %s)", DRIFT_EVENT, summary["model"], summary["model_version"], event.id)
    return str(event.id)


def retrain_trigger(name: str, parameters: dict[str, Any]) -> Any:
    """A deployment trigger: one pipeline run per drift event of model ``name``, with ``parameters``."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=f"retrain {name} on drift",
        expect={DRIFT_EVENT},
        match={"prefect.resource.id": model_resource(name)},
        parameters=parameters,
    )
