"""The export steps in order, for callers outside a flow: export + parity → register → promote → publish.

The Prefect flow runs the same four functions as separate tasks (pipelines/flows.py), so
a transient fault in one is retried without repeating the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.export.package import ExportedModel, export_model
from pipelines.export.parity import ParityReport
from pipelines.export.registry import PromotionDecision, RegisteredVersion, promote, register
from pipelines.settings import FluxoSettings
from pipelines.tracking import configure_mlflow


@dataclass
class ExportResult:
    run_id: str
    export_dir: Path
    parity: ParityReport
    registered_model: str
    model_version: str
    promotion: PromotionDecision
    served_dir: Path | None = None


def register_step(root: Path, settings: FluxoSettings, exported: ExportedModel) -> RegisteredVersion:
    from mlflow.tracking import MlflowClient

    configure_mlflow(Path(root), settings)
    return register(MlflowClient(), exported.model_dir, exported.metadata, settings.tracking.champion_alias)


def promote_step(
    root: Path, settings: FluxoSettings, exported: ExportedModel, registered: RegisteredVersion
) -> PromotionDecision:
    from mlflow.tracking import MlflowClient

    configure_mlflow(Path(root), settings)
    return promote(MlflowClient(), registered, exported.metadata, settings.tracking.champion_metric,
                   settings.tracking.champion_alias)


def publish_step(
    root: Path, settings: FluxoSettings, exported: ExportedModel, registered: RegisteredVersion,
    decision: PromotionDecision,
) -> Path | None:
    """Point running servers at the new champion; nothing to do when it was not promoted."""
    from pipelines.export.publish import publish_champion

    if not decision.promoted:
        return None
    return publish_champion(root, settings, registered.name, registered.version, exported.model_dir).path


def summarize_export(
    exported: ExportedModel, registered: RegisteredVersion, decision: PromotionDecision, served: Path | None
) -> ExportResult:
    return ExportResult(exported.identity.run_id, exported.model_dir, exported.parity, registered.name,
                        registered.version, decision, served)


def export_run(
    root: Path, settings: FluxoSettings, run_id: str | None = None, checkpoint: Path | None = None
) -> ExportResult:
    """Export a run's best model, check it against PyTorch, register it, decide promotion and publish."""
    exported = export_model(root, settings, run_id, checkpoint)
    registered = register_step(root, settings, exported)
    decision = promote_step(root, settings, exported, registered)
    served = publish_step(root, settings, exported, registered, decision)
    return summarize_export(exported, registered, decision, served)
