"""The registry's steps after export: register → gate → promote → publish, each a plain function.

pipelines/release.py holds their one order; the Prefect flow runs each as its own task, so a
transient fault in one is retried without repeating the others.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.data.store import Dataset
from pipelines.registry.gate import GateDecision
from pipelines.registry.versions import PromotionDecision, RegisteredVersion, promote, register
from pipelines.context import RunContext
from serving.contract import MODEL_FILE

if TYPE_CHECKING:  # export builds the model directory these steps register; they only read it
    from pipelines.export.package import ExportedModel


def register_step(ctx: RunContext, exported: ExportedModel) -> RegisteredVersion:
    return register(ctx.client(), exported.model_dir, exported.metadata, ctx.settings.tracking.champion_alias)


def gate_step(ctx: RunContext, exported: ExportedModel, registered: RegisteredVersion,
              dataset: Dataset | None = None) -> GateDecision:
    """Score the candidate and the current champion as served on the candidate's test split."""
    from pipelines.data.store import read_dataset
    from pipelines.registry.gate import BaselineVerdict, decide, served_score
    from pipelines.registry.store import materialize_version
    from pipelines.registry.versions import champion_version

    settings, client = ctx.settings, ctx.client()
    dataset = dataset or read_dataset(ctx.root / settings.data.data_dir)
    candidate = served_score(exported.model_dir / MODEL_FILE, dataset, registered.version)
    champion = None
    held = champion_version(client, registered.name, settings.tracking.champion_alias)
    if held is not None and str(held.version) != registered.version:
        served = materialize_version(ctx, registered.name, str(held.version))
        champion = served_score(served.onnx_path, dataset, str(held.version))
    run_id = registered.run_id
    run = client.get_run(run_id)
    baselines = BaselineVerdict.of_run(run.data.tags, run.data.metrics)
    decision = decide(candidate, champion, settings.gate, exported.identity.data_version, baselines)
    for metric, value in candidate.metrics.items():
        client.log_metric(run_id, f"served_test_{metric}", value)
    if champion is not None:
        client.log_metric(run_id, f"gate_champion_{decision.metric}", champion.metrics[decision.metric])
    client.log_dict(run_id, decision.as_dict(), "export/gate.json")
    return decision


def promote_step(
    ctx: RunContext, exported: ExportedModel, registered: RegisteredVersion, gate: GateDecision | None = None,
) -> PromotionDecision:
    def regate() -> GateDecision:  # the champion moved since ``gate`` scored: compare with the new one
        return gate_step(ctx, exported, registered)

    tracking = ctx.settings.tracking
    return promote(ctx.client(), registered, exported.metadata, gate or regate(), tracking.champion_alias,
                   tracking.challenger_alias, regate=regate)


def publish_step(
    ctx: RunContext, exported: ExportedModel, registered: RegisteredVersion, decision: PromotionDecision,
) -> Path | None:
    """Point running servers at the version under the alias it now holds (champion or challenger)."""
    from pipelines.registry.publish import publish_alias

    if decision.alias is None:
        return None
    return publish_alias(ctx, registered.name, registered.version, decision.alias,
                         exported.model_dir).path
