"""The model store: a registry version (or an export directory) → a served model directory on disk.

Monitor, batch prediction, the gate, the report and ``fluxo serve`` all fetch a model through here. A version exported on this machine
is copied from its local model directory (nothing is fetched back from MLflow); any
other version is downloaded once. Either way the served copy is the registered artifact
byte for byte plus ``registry.json`` (serving/contract.py), staged and renamed into place.
This module never imports torch: ``fluxo serve`` must start without it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from pipelines.errors import FluxoError
from pipelines.settings import FluxoSettings
from pipelines.context import RunContext
from pipelines.tracking import is_refusal, registry_version, tracking_refusal
from serving import ServingError
from serving.checksums import damage, read_checksums, seal
from serving.contract import ModelDir, RegistryEntry, is_model_dir, materialize, read_model_dir

log = logging.getLogger(__name__)


def champion_uri(name: str, alias: str) -> str:
    return f"models:/{name}@{alias}"


class NotRegisteredYet(FluxoError):
    """The registry answered, and holds no version under the alias (yet): a fresh deployment's state."""


def _served_dir(root: Path, settings: FluxoSettings, name: str, version: str) -> Path:
    return Path(root) / settings.serve.model_cache / f"{name}-v{version}"


def _resolve(client, uri: str, explicit: bool):
    """(name, model version, alias or None) for ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.

    ``explicit``: the user named ``uri`` with ``--model``; if the registry lacks it, the error
    says what the registry holds instead, not to pass ``--model``.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    if not uri.startswith("models:/"):
        raise FluxoError(f"--model {uri!r}: expected an export directory or models:/NAME@ALIAS or models:/NAME/VERSION")
    name, _, alias = uri.removeprefix("models:/").partition("@")
    if not alias and not name.partition("/")[2].isdigit():
        raise FluxoError(f"--model {uri}: name an alias or a version number, e.g. "
                         f"models:/{name.partition('/')[0]}@champion or models:/{name.partition('/')[0]}/1")
    try:
        return registry_version(client, uri)
    except MlflowException as error:
        refused = tracking_refusal(error) if is_refusal(error) else None
        if refused is not None:
            raise refused from None
        if explicit:
            raise FluxoError(f"--model {uri}: {_what_the_registry_holds(client, uri, error)}") from None
        raise NotRegisteredYet(
            f"{uri}: not in the model registry at {mlflow.get_registry_uri()} ({error.message}); "
            "run `fluxo run` first or pass --model"
        ) from None


_LISTED = 10  # names or versions spelled out in an error before "and N more"


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown if len(items) <= _LISTED else f"{shown} and {len(items) - _LISTED} more"


def _what_the_registry_holds(client, uri: str, error: Exception) -> str:
    """Why ``uri`` is not there, and what is: the model's versions and aliases, else the registered models."""
    import mlflow
    from mlflow.exceptions import MlflowException

    registry = mlflow.get_registry_uri()
    name, _, alias = uri.removeprefix("models:/").partition("@")
    name, _, number = name.partition("/")
    try:
        try:
            model = client.get_registered_model(name)
        except MlflowException:
            names = sorted(found.name for found in client.search_registered_models(max_results=1000))
            holds = (f"it holds {_listed(names)} (`fluxo status --model NAME` lists one's versions and aliases)"
                     if names else "it holds no model yet; `fluxo run` trains and registers one")
            return f"the model registry at {registry} has no model named {name!r}; {holds}"
        versions = sorted((version.version for version in client.search_model_versions(f"name='{name}'")),
                          key=int, reverse=True)
    except MlflowException:  # cannot even list (a permission, say): MLflow's own words, then
        return f"not in the model registry at {registry} ({getattr(error, 'message', error)})"
    missing = f"has no alias {alias!r}" if alias else f"has no version {number}"
    aliases = ", ".join(f"@{held} = v{version}" for held, version in sorted(model.aliases.items())) or "none"
    numbers = _listed([f"v{version}" for version in versions]) or "none"
    return (f"{name} {missing} in the model registry at {registry}; its versions: {numbers}; "
            f"its aliases: {aliases} (`fluxo status --model {name}` shows each version's run, data and gate)")


def _cached(target: Path, name: str, version: str) -> ModelDir | None:
    """The copy of ``name`` v``version`` made earlier when it is whole, else None (the caller copies afresh).

    A copy records its checksums (serving/checksums.py): one that no longer matches them, or
    whose files no longer read (torn by a crash or a full disk), is logged and replaced by the
    caller's fresh copy, instead of failing every start until someone deletes it. A copy made
    before checksums existed is hashed once, as it is, so its next use checks it.
    """
    if not is_model_dir(target):
        return None
    try:
        served = read_model_dir(target)
        recorded = read_checksums(target)
        problem = damage(target, recorded) if recorded is not None else None
    except ServingError as error:
        problem = str(error)
    if problem is not None:
        log.warning("model cache: %s is damaged (%s); discarding it and fetching %s v%s again",
                    target, problem, name, version)
        return None
    if served.registry is None or (served.registry.model_name, served.version) != (name, version):
        return None
    if recorded is None:
        log.info("model cache: %s predates checksums; recording them once", target)
        try:
            seal(target)
        except OSError as error:  # a read-only cache still serves; it is just not checked next time
            log.warning("model cache: could not record checksums in %s (%s)", target, error)
    return served


def materialize_version(
    ctx: RunContext, name: str, version: str, alias: str | None = None, local: Path | None = None,
) -> ModelDir:
    """The served model directory of ``name`` v``version``: copied from ``local`` when given, else downloaded."""
    target = _served_dir(ctx.root, ctx.settings, name, version)
    entry = RegistryEntry(model_name=name, model_version=version, alias=alias)
    served = _cached(target, name, version)
    if served is not None:
        return served  # versions are immutable: a whole copy made earlier is still exact
    if local is not None and is_model_dir(local):
        return materialize(local, target, entry)
    import mlflow

    with tempfile.TemporaryDirectory(dir=target.parent if target.parent.is_dir() else None) as scratch:
        downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=scratch))
        if not is_model_dir(downloaded):
            raise FluxoError(
                f"models:/{name}/{version} holds no model.onnx with metadata.json: it was not registered by this "
                f"version of fluxo; re-export its run with `fluxo export --run-id RUN`"
            )
        return materialize(downloaded, target, entry)


def materialize_model(ctx: RunContext, model: str | None, name: str) -> ModelDir:
    """What ``fluxo serve --model`` names: an export directory, a ``models:/`` URI, or ``name``'s champion."""
    if model and Path(model).is_dir():
        if not is_model_dir(model):
            raise FluxoError(f"--model {model}: needs model.onnx and metadata.json; point it at a `fluxo export` directory")
        return read_model_dir(model)
    uri = model or champion_uri(name, ctx.settings.tracking.champion_alias)
    name, version, alias = _resolve(ctx.client(), uri, explicit=model is not None)
    served = materialize_version(ctx, name, str(version.version), alias)
    log.info("%s v%s: model directory %s", name, version.version, served.path)
    return served
