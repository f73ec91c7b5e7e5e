"""The export steps in order, for callers outside a flow: export + parity → register → promote → publish.

The Prefect flow runs the same four functions as separate tasks (pipelines/flows.py), so
a transient fault in one is retried without repeating the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.data.store import Dataset
from pipelines.export.gate import GateDecision
from pipelines.export.package import ExportedModel, export_model
from pipelines.export.parity import ParityReport
from pipelines.export.registry import PromotionDecision, RegisteredVersion, promote, register
from pipelines.settings import FluxoSettings
from pipelines.tracking import configure_mlflow
from serving.contract import MODEL_FILE


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


def gate_step(root: Path, settings: FluxoSettings, exported: ExportedModel, registered: RegisteredVersion,
              dataset: Dataset | None = None) -> GateDecision:
    """Score the candidate and the current champion as served on the candidate's test split."""
    from mlflow.tracking import MlflowClient

    from pipelines.data.store import read_dataset
    from pipelines.export.gate import decide, served_score
    from pipelines.export.publish import materialize_version
    from pipelines.export.registry import champion_version

    configure_mlflow(Path(root), settings)
    client = MlflowClient()
    dataset = dataset or read_dataset(Path(root) / settings.data.data_dir)
    candidate = served_score(exported.model_dir / MODEL_FILE, dataset, registered.version)
    champion = None
    held = champion_version(client, registered.name, settings.tracking.champion_alias)
    if held is not None and str(held.version) != registered.version:
        served = materialize_version(root, settings, registered.name, str(held.version))
        champion = served_score(served.onnx_path, dataset, str(held.version))
    decision = decide(candidate, champion, settings.gate, exported.identity.data_version)
    run_id = registered.run_id
    for metric, value in candidate.metrics.items():
        client.log_metric(run_id, f"served_test_{metric}", value)
    if champion is not None:
        client.log_metric(run_id, f"gate_champion_{settings.gate.metric}", champion.metrics[settings.gate.metric])
    client.log_dict(run_id, decision.as_dict(), "export/gate.json")
    return decision


def promote_step(
    root: Path, settings: FluxoSettings, exported: ExportedModel, registered: RegisteredVersion,
    gate: GateDecision | None = None,
) -> PromotionDecision:
    from mlflow.tracking import MlflowClient

    def regate() -> GateDecision:  # the champion moved since ``gate`` scored: compare with the new one
        return gate_step(root, settings, exported, registered)

    gate = gate or regate()
    configure_mlflow(Path(root), settings)
    return promote(MlflowClient(), registered, exported.metadata, gate, settings.tracking.champion_alias,
                   settings.tracking.challenger_alias, regate=regate)


def publish_step(
    root: Path, settings: FluxoSettings, exported: ExportedModel, registered: RegisteredVersion,
    decision: PromotionDecision,
) -> Path | None:
    """Point running servers at the version under the alias it now holds (champion or challenger)."""
    from pipelines.export.publish import publish_alias

    if decision.alias is None:
        return None
    return publish_alias(root, settings, registered.name, registered.version, decision.alias,
                         exported.model_dir).path


def summarize_export(
    exported: ExportedModel, registered: RegisteredVersion, decision: PromotionDecision, served: Path | None
) -> ExportResult:
    return ExportResult(exported.identity.run_id, exported.model_dir, exported.parity, registered.name,
                        registered.version, decision, served)


def export_run(
    root: Path, settings: FluxoSettings, run_id: str | None = None, checkpoint: Path | None = None
) -> ExportResult:
    """Export a run's best model, check it against PyTorch, register it, gate it, give it its alias, publish."""
    exported = export_model(root, settings, run_id, checkpoint)
    registered = register_step(root, settings, exported)
    decision = promote_step(root, settings, exported, registered, gate_step(root, settings, exported, registered))
    served = publish_step(root, settings, exported, registered, decision)
    return summarize_export(exported, registered, decision, served)
