"""Warm start and transfer: begin a run from another model's weights instead of random ones.

``train.init_from`` names the source: ``champion`` (this dataset's registered champion, when
it is compatible, else a fresh start), ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or an
MLflow run id (these must be compatible). Compatible means the same architecture, model
config and input shape: the network is the same function of the same inputs. When only the
labels differ the head (the last linear layer) keeps its fresh initialisation and everything
below it is taken over: transfer learning. ``train.freeze`` then keeps named layers fixed.

Only a fresh run starts this way: a ``--resume`` restores its own state, so crash-safe
resumption is unchanged. Under DDP rank 0 loads the weights and DDP hands them to the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from pipelines.errors import FluxoError
from pipelines.settings import FluxoSettings

log = logging.getLogger(__name__)

CHAMPION = "champion"
SCRATCH = "scratch"
COMPARED = ("architecture", "params", "input_shape")


class IncompatibleWarmStart(FluxoError):
    """The source's network is another function of other inputs; its weights cannot start this run."""


@dataclass(frozen=True)
class WarmStart:
    """What a run started from: the source, and which weights it took over or left fresh."""

    source: str
    run_id: str
    loaded: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)  # the head, when the labels differ


def _run_of(client: Any, value: str, alias_name: str | None) -> tuple[str, str] | None:
    """(label, run id) of ``value``; None when ``champion`` names no version yet."""
    from mlflow.exceptions import MlflowException

    if value == CHAMPION:
        if alias_name is None:
            return None
        name, alias = alias_name.split("@", 1)
        try:
            version = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None
        return f"models:/{name}/{version.version} (@{alias})", version.run_id
    from pipelines.tracking import registry_version

    try:
        if value.startswith("models:/"):
            name, version, _ = registry_version(client, value)
            return f"models:/{name}/{version.version}", version.run_id
        client.get_run(value)
        return f"run {value}", value
    except MlflowException as error:
        raise FluxoError(f"train.init_from={value!r}: not found in the tracking store ({error.message}); give "
                         "models:/NAME@ALIAS, models:/NAME/VERSION or a run id of this store") from None


def _checkpoint_of(root: Path, settings: FluxoSettings, run_id: str, scratch: Path) -> Path:
    local = Path(root) / settings.train.checkpoint_dir / run_id / "best.pt"
    if local.is_file():
        return local
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/best.pt",
                                                        dst_path=str(scratch)))
    except Exception as error:  # noqa: BLE001 - MLflow raises several types for a missing artifact
        raise FluxoError(f"train.init_from: run {run_id} has no checkpoints/best.pt ({error}); "
                         "start from a run fluxo trained") from None


def _head(inner: nn.Module) -> list[str]:
    """Parameter names of the last linear layer: what maps features to labels."""
    last = None
    for name, module in inner.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        return []
    return [f"{last}.{p}" for p, _ in dict(inner.named_modules())[last].named_parameters(recurse=False)]


def transfer(inner: nn.Module, spec: dict[str, Any], payload: dict[str, Any], source: str) -> tuple[list[str], list[str]]:
    """Load ``payload``'s weights into ``inner`` (the model under Standardized); (loaded, replaced) names.

    Raises :class:`IncompatibleWarmStart` naming what differs. The standardisation buffers are
    this run's (computed on its own data), never the source's.
    """
    theirs = payload["spec"]
    for key in COMPARED:
        ours, other = spec.get(key), theirs.get(key)
        if key == "input_shape":
            ours, other = list(ours or []), list(other or [])
        if ours != other:
            raise IncompatibleWarmStart(
                f"train.init_from: {source} has {key} {other!r}, this run {ours!r}; warm start needs the same "
                "architecture, model.params and input shape (or train from scratch: unset train.init_from)")
    weights = {k.removeprefix("inner."): v for k, v in payload["state_dict"].items() if k.startswith("inner.")}
    head = set(_head(inner)) if list(theirs.get("labels", [])) != list(spec.get("labels", [])) else set()
    state = inner.state_dict()
    loaded = []
    for name, value in state.items():
        if name in head or name not in weights:
            continue
        if weights[name].shape != value.shape:
            raise IncompatibleWarmStart(f"train.init_from: {source}'s {name} has shape {tuple(weights[name].shape)}, "
                                        f"this run's {tuple(value.shape)}")
        state[name] = weights[name]
        loaded.append(name)
    inner.load_state_dict(state)
    return loaded, sorted(head)


def freeze(inner: nn.Module, prefixes: list[str]) -> list[str]:
    """Stop gradients for every parameter under each prefix (e.g. ``features``); the names frozen."""
    names = [name for name, _ in inner.named_parameters()]
    frozen = []
    for prefix in prefixes:
        hits = [n for n in names if n == prefix or n.startswith(f"{prefix}.")]
        if not hits:
            top = sorted({n.split(".")[0] for n in names})
            raise FluxoError(f"train.freeze: {prefix!r} names no layer of this model; its layers are "
                             f"{', '.join(top)} (`fluxo models show` lists them all)")
        frozen += hits
    parameters = dict(inner.named_parameters())
    for name in frozen:
        parameters[name].requires_grad_(False)
    return frozen


def warm_start(root: Path, settings: FluxoSettings, inner: nn.Module, spec: dict[str, Any],
               registered_model: str) -> WarmStart | None:
    """Apply ``train.init_from`` to ``inner``; None for a fresh start (unset, or no compatible champion)."""
    import tempfile

    from mlflow.tracking import MlflowClient

    from pipelines.train.checkpoint import load_checkpoint

    value = settings.train.init_from
    if value in (None, SCRATCH):
        return None
    found = _run_of(MlflowClient(), value, f"{registered_model}@{settings.tracking.champion_alias}")
    if found is None:
        log.info("train.init_from=champion: %s has no champion yet; training from scratch", registered_model)
        return None
    source, run_id = found
    with tempfile.TemporaryDirectory() as scratch:
        payload = load_checkpoint(_checkpoint_of(root, settings, run_id, Path(scratch)))
    try:
        loaded, replaced = transfer(inner, spec, payload, source)
    except IncompatibleWarmStart as error:
        if value != CHAMPION:
            raise
        log.info("train.init_from=champion: %s; training from scratch", str(error).split(": ", 1)[1])
        return None
    log.info("warm start from %s: %d weight tensors taken over%s", source, len(loaded),
             f", head replaced ({', '.join(replaced)}): the labels differ" if replaced else "")
    return WarmStart(source, run_id, loaded, replaced)
