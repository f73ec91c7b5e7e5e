"""Model Registry: the alias ``champion`` moves only to a version at least as good as the current one."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    version: str
    metric: str
    value: float
    champion_version: str | None
    champion_value: float | None

    @property
    def reason(self) -> str:
        if self.champion_version is None:
            return f"promoted v{self.version}: first version ({self.metric}={self.value:.4f})"
        verb = "promoted" if self.promoted else "kept champion"
        relation = ">=" if self.promoted else "<"
        return (
            f"{verb} v{self.champion_version if not self.promoted else self.version}: "
            f"v{self.version} {self.metric}={self.value:.4f} {relation} "
            f"champion v{self.champion_version} {self.metric}={self.champion_value:.4f}"
        )


def current_champion(client: MlflowClient, name: str, alias: str) -> tuple[str, str] | None:
    """(version, run_id) of the version holding ``alias``, or None when no version holds it yet."""
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return str(version.version), str(version.run_id)


def promote_if_better(
    client: MlflowClient, name: str, version: str, run_id: str, metric: str, alias: str
) -> PromotionDecision:
    """Move ``alias`` to ``version`` if its run's ``metric`` is at least the champion's; record why."""
    value = client.get_run(run_id).data.metrics.get(metric)
    if value is None:
        raise ValueError(f"run {run_id} has no metric {metric!r} to compare; check tracking.champion_metric")
    champion = current_champion(client, name, alias)
    champion_value = None
    if champion is not None:
        champion_value = client.get_run(champion[1]).data.metrics.get(metric, float("-inf"))
    promoted = champion is None or value >= champion_value
    decision = PromotionDecision(
        promoted, version, metric, value, champion[0] if champion else None, champion_value
    )
    if promoted:
        client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "fluxo.promotion", decision.reason)
    client.set_tag(run_id, "fluxo.promotion", decision.reason)
    log.info("%s: %s", name, decision.reason)
    return decision
