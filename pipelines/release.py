"""The one order of the steps after training: export + parity → register → gate → promote → publish.

``fluxo export`` (and anything outside a flow) runs it with the plain step functions; the
pipeline flow (pipelines/flows.py) runs the same order with each step wrapped as a Prefect
task, so a transient fault in one is retried without repeating the others. A new step is
added here, once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.context import RunContext
from pipelines.registry.versions import PromotionDecision, RegisteredVersion
from serving.scoring import ParityReport

if TYPE_CHECKING:
    from pipelines.export.exported import ExportedModel
    from pipelines.registry.gate import GateDecision


@dataclass(frozen=True)
class ReleaseSteps:
    """How each step runs: the plain functions below, or (in the flow) each as a Prefect task."""

    export: Callable[[RunContext, str | None, Path | None], ExportedModel]
    register: Callable[[RunContext, ExportedModel], RegisteredVersion]
    gate: Callable[[RunContext, ExportedModel, RegisteredVersion], GateDecision]
    promote: Callable[[RunContext, ExportedModel, RegisteredVersion, GateDecision], PromotionDecision]
    publish: Callable[[RunContext, ExportedModel, RegisteredVersion, PromotionDecision], Path | None]


def _export(ctx: RunContext, run_id: str | None, checkpoint: Path | None) -> ExportedModel:
    from pipelines.export.package import export_model  # torch: only when a model is exported

    return export_model(ctx, run_id, checkpoint)


def plain_steps() -> ReleaseSteps:
    """The steps as plain calls (the flow wraps each as a task); an unchanged rerun never loads torch."""
    from pipelines.registry.steps import gate_step, promote_step, publish_step, register_step

    return ReleaseSteps(_export, register_step, gate_step, promote_step, publish_step)


@dataclass
class ExportResult:
    """What the tail of a run did; ``unchanged``: the run equals one already registered, nothing moved."""

    run_id: str
    export_dir: Path
    parity: ParityReport
    registered_model: str
    model_version: str
    promotion: PromotionDecision | None
    served_dir: Path | None = None
    unchanged: bool = False


def export_run(
    ctx: RunContext, run_id: str | None = None, checkpoint: Path | None = None,
    steps: ReleaseSteps | None = None, reused: bool = False,
) -> ExportResult:
    """Export a run's best model, check it against PyTorch, register it, gate it, give it its alias, publish.

    ``reused``: the run's training was reused from an earlier identical run; if its version is
    already registered, the tail stops there and moves no alias. ``steps``: :func:`plain_steps` unless given.
    """
    steps = steps or plain_steps()
    exported = steps.export(ctx, run_id, checkpoint)
    registered = steps.register(ctx, exported)
    if reused and not registered.created:
        return ExportResult(exported.identity.run_id, exported.model_dir, exported.parity, registered.name,
                            registered.version, None, unchanged=True)
    gate = steps.gate(ctx, exported, registered)
    decision = steps.promote(ctx, exported, registered, gate)
    served = steps.publish(ctx, exported, registered, decision)
    return ExportResult(exported.identity.run_id, exported.model_dir, exported.parity, registered.name,
                        registered.version, decision, served)
