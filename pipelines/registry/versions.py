"""Model Registry: register a model directory once per run, and move ``champion`` only to a fit version.

Both steps are safe to repeat: a retried registration finds the version its run already
has, and a promotion of the version that already holds the alias changes nothing.
Only versions with the champion's input contract (kind, shape, dtype, labels, upload
recipe) may take its alias: a server following the alias must never switch to a model
that reads other inputs or answers other labels.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipelines.errors import FluxoError
from serving.contract import (
    METADATA_FILE, MODEL_FILE, REPORT_FILE, VARIANTS, ModelMetadata, contract_mismatch, variant_file,
)

log = logging.getLogger(__name__)

CONTRACT_TAG = "fluxo.input_contract"
PROMOTION_TAG = "fluxo.promotion"
ARTIFACT_PATH = "model"


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    created: bool  # False when an earlier attempt of the same run had registered it


@dataclass(frozen=True)
class PromotionDecision:
    """Which alias the version took, and why (the gate's reasons when it did not become champion)."""

    promoted: bool
    version: str
    metric: str
    value: float
    champion_version: str | None
    champion_value: float | None
    alias: str | None = None  # the alias the version holds now: champion, challenger, or None
    reasons: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        score = f"served {self.metric}={self.value:.4f}"
        if self.champion_version == self.version:
            return f"v{self.version} is already the champion ({score})"
        if self.promoted and self.champion_version is None:
            return f"promoted v{self.version}: first version ({score})"
        if self.promoted:
            return (f"promoted v{self.version}: {score} >= champion v{self.champion_version} "
                    f"{self.champion_value:.4f} on the same test split")
        kept = f"kept champion v{self.champion_version}" if self.champion_version else "no champion yet"
        return f"{kept}; v{self.version} is {self.alias or 'not aliased'}: " + "; ".join(self.reasons)


def _describe(contract: dict[str, Any]) -> str:
    labels = contract.get("labels") or []
    shown = ", ".join(labels[:5]) + (", ..." if len(labels) > 5 else "")
    return f"{contract.get('kind') or 'inputs'} of shape {contract.get('input_shape')} → {len(labels)} labels ({shown})"


def champion_version(client: Any, name: str, alias: str) -> Any | None:
    """The model version holding ``alias``, or None when no version holds it (or no such model)."""
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import is_refusal

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if is_refusal(error):
            raise  # a wrong password is not "no champion" (a follower would wait forever)
        return None


def check_contract(client: Any, name: str, alias: str, metadata: ModelMetadata, version: str | None = None) -> None:
    """Refuse a model whose input contract differs from the champion's; the message says what differs."""
    champion = champion_version(client, name, alias)
    if champion is None or str(champion.version) == version or CONTRACT_TAG not in champion.tags:
        return
    theirs = json.loads(champion.tags[CONTRACT_TAG])
    ours = metadata.input_contract()
    if contract_mismatch(theirs, ours) is None:
        return
    raise FluxoError(
        f"{name}: the {alias} v{champion.version} takes {_describe(theirs)}, this model (run {metadata.run_id}) takes "
        f"{_describe(ours)} ({contract_mismatch(theirs, ours)}); a model with another input contract can never take the "
        f"{alias!r} alias, since every server following it would break: register it under its own name with "
        "--set tracking.registered_model=NAME when training"
    )


def _existing_version(client: Any, name: str, run_id: str) -> Any | None:
    versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _tag_version(client: Any, name: str, version: str, metadata: ModelMetadata) -> None:
    """Tags the gate and a person read: the input contract, data version and dataset."""
    client.set_model_version_tag(name, version, CONTRACT_TAG, json.dumps(metadata.input_contract(), sort_keys=False))
    client.set_model_version_tag(name, version, "fluxo.data_version", str(metadata.data_version))
    client.set_model_version_tag(name, version, "fluxo.dataset", str(metadata.dataset))


def _log_model_dir(model_dir: Path, run_id: str) -> None:
    """Log the model directory to its run as an MLflow ONNX model (so `mlflow models serve` and the UI
    know it) whose ``model.onnx``, ``metadata.json``, ``report.html`` and kept variants are the exported files."""
    import mlflow
    import mlflow.onnx
    import onnx

    with tempfile.TemporaryDirectory() as scratch:
        flavour = Path(scratch) / ARTIFACT_PATH
        mlflow.onnx.save_model(onnx.load(str(Path(model_dir) / MODEL_FILE)), str(flavour),
                               pip_requirements=["onnx", "onnxruntime"], save_as_external_data=False)
        shutil.copy2(Path(model_dir) / METADATA_FILE, flavour / METADATA_FILE)
        # Replicas that download the version serve the report at /report and the kept variants (FLUXO_VARIANT).
        for name in (REPORT_FILE, *(variant_file(v) for v in VARIANTS[1:])):
            if (Path(model_dir) / name).is_file():
                shutil.copy2(Path(model_dir) / name, flavour / name)
        with mlflow.start_run(run_id=run_id):
            mlflow.log_artifacts(str(flavour), ARTIFACT_PATH)


def register(client: Any, model_dir: Path, metadata: ModelMetadata, alias: str) -> RegisteredVersion:
    """Log the model directory to its run and register it, once: a retry finds the version it made."""
    from mlflow.exceptions import MlflowException

    name, run_id = metadata.model_name, str(metadata.run_id)
    check_contract(client, name, alias, metadata)
    existing = _existing_version(client, name, run_id)
    if existing is None:
        _log_model_dir(model_dir, run_id)
        try:
            client.create_registered_model(name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        existing = client.create_model_version(name, source=f"runs:/{run_id}/{ARTIFACT_PATH}", run_id=run_id)
        created = True
        log.info("registered %s v%s from run %s", name, existing.version, run_id)
    else:
        created = False
        log.info("run %s is already registered as %s v%s", run_id, name, existing.version)
    version = str(existing.version)
    _tag_version(client, name, version, metadata)
    return RegisteredVersion(name, version, run_id, created)


def move_alias(client: Any, name: str, alias: str, version: str, reason: str, champion_alias: str = "champion") -> str | None:
    """Point ``alias`` at ``version``; for the champion, record the move on both versions (for rollback).

    Returns the version that held the alias before (None when none did).
    """
    import time

    before = champion_version(client, name, alias)
    previous = None if before is None else str(before.version)
    if previous == version:
        return previous
    client.set_registered_model_alias(name, alias, version)
    if alias == champion_alias:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        client.set_model_version_tag(name, version, "fluxo.champion.since", stamp)
        client.set_model_version_tag(name, version, "fluxo.champion.reason", reason[:4000])
        if previous is not None:
            client.set_model_version_tag(name, version, "fluxo.champion.previous", previous)
            client.set_model_version_tag(name, previous, "fluxo.champion.until", stamp)
            client.set_model_version_tag(name, previous, "fluxo.champion.replaced_by", version)
    log.info("%s: %s → v%s (%s)", name, alias, version, reason)
    return previous


def drop_alias_if_held(client: Any, name: str, alias: str, version: str) -> None:
    """Remove ``alias`` when ``version`` holds it (a challenger that became champion is no longer one)."""
    held = champion_version(client, name, alias)
    if held is not None and str(held.version) == version:
        client.delete_registered_model_alias(name, alias)


REGATE_ATTEMPTS = 3


def _compared_with(gate: Any) -> str | None:
    return None if gate.champion is None else str(gate.champion.version)


def promote(
    client: Any, registered: RegisteredVersion, metadata: ModelMetadata, gate: Any, champion_alias: str,
    challenger_alias: str, regate: Callable[[], Any] | None = None,
) -> PromotionDecision:
    """Give the version the alias the gate decided: champion, else challenger; record why on both versions.

    ``gate`` is the :class:`pipelines.registry.gate.GateDecision` for this version against the
    champion of the moment it scored. Compare-and-set: the champion alias moves only while it
    still points at the version the gate compared against. When another run promoted in between
    (two pipelines that both beat vN), ``regate`` scores this version again against the new
    champion, so the later run cannot replace a better model it never saw; without ``regate``
    such a race is an error rather than a silent overwrite. Safe to repeat: a version that
    already holds the alias keeps it.
    """
    name, version, run_id = registered.name, registered.version, registered.run_id
    check_contract(client, name, champion_alias, metadata, version)
    for _ in range(REGATE_ATTEMPTS):
        champion = champion_version(client, name, champion_alias)
        current = None if champion is None else str(champion.version)
        if current == version or current == _compared_with(gate):
            break
        if regate is None:
            raise FluxoError(f"{name}: the {champion_alias} moved to v{current} after v{version} was gated against "
                             f"{'v' + _compared_with(gate) if gate.champion else 'no champion'}; run the gate again")
        log.info("%s: the %s moved to v%s since v%s was gated against %s; gating again", name, champion_alias,
                 current, version, f"v{_compared_with(gate)}" if gate.champion else "no champion")
        gate = regate()
    else:
        raise FluxoError(f"{name}: the {champion_alias} moved {REGATE_ATTEMPTS} times while v{version} was being gated "
                         "(other pipelines promoting at once); run the pipeline again when they are done")
    held = current == version
    promoted = held or gate.promoted
    alias = champion_alias if promoted else challenger_alias
    decision = PromotionDecision(
        promoted, version, gate.metric, gate.value, str(champion.version) if champion else None,
        gate.champion_value, alias, tuple(gate.reasons),
    )
    if promoted:
        move_alias(client, name, champion_alias, version, decision.reason, champion_alias)
        drop_alias_if_held(client, name, challenger_alias, version)
    else:
        move_alias(client, name, challenger_alias, version, decision.reason, champion_alias)
    client.set_model_version_tag(name, version, "fluxo.gate", gate.as_tag())
    if gate.champion is not None and not held:
        client.set_model_version_tag(name, gate.champion.version, f"fluxo.gate.rescored_for_v{version}",
                                     json.dumps({gate.metric: gate.champion_value, "data_version": gate.data_version}))
    client.set_model_version_tag(name, version, PROMOTION_TAG, decision.reason[:4000])
    client.set_tag(run_id, PROMOTION_TAG, decision.reason[:4000])
    log.info("%s: %s", name, decision.reason)
    return decision
