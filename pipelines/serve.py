"""Resolve what to serve (the registry's champion by default) into a local model directory.

The service itself only reads ``model.onnx`` + ``metadata.json`` (serving/README.md);
this is the one place that talks to MLflow on its behalf.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import yaml

from pipelines.settings import FluxoSettings
from pipelines.errors import FluxoError
from pipelines.export.step import METADATA_FILE, MODEL_FILE
from pipelines.tracking import configure_mlflow

log = logging.getLogger(__name__)


def champion_uri(settings: FluxoSettings) -> str:
    return f"models:/{settings.registered_model_name()}@{settings.tracking.champion_alias}"


def materialize_model(root: Path, settings: FluxoSettings, model: str | None = None) -> Path:
    """A directory holding ``model.onnx`` and ``metadata.json`` for ``model``.

    ``model`` is a local export directory, a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``
    URI, or None for the configured champion.
    """
    if model and Path(model).is_dir():
        directory = Path(model)
        for required in (MODEL_FILE, METADATA_FILE):
            if not (directory / required).is_file():
                raise FluxoError(f"{directory / required}: missing; point --model at a `fluxo export` directory")
        return directory

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    configure_mlflow(Path(root), settings)
    uri = model or champion_uri(settings)
    if not uri.startswith("models:/"):
        raise FluxoError(f"--model {uri!r}: expected an export directory or models:/NAME@ALIAS or models:/NAME/VERSION")
    name, _, selector = uri.removeprefix("models:/").partition("@")
    client = MlflowClient()
    try:
        if selector:
            version = client.get_model_version_by_alias(name, selector)
        else:
            name, _, number = name.partition("/")
            version = client.get_model_version(name, number)
    except MlflowException as error:
        raise FluxoError(
            f"{uri}: not in the model registry at {mlflow.get_tracking_uri()} ({error.message}); "
            "run `fluxo run` first or pass --model"
        ) from error

    target = Path(root) / settings.serve.model_cache / f"{name}-v{version.version}"
    if not (target / METADATA_FILE).is_file():
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}", dst_path=str(staging))
        mlmodel = yaml.safe_load((staging / "MLmodel").read_text())
        metadata = dict(mlmodel.get("metadata") or {})
        if not metadata or not (staging / MODEL_FILE).is_file():
            raise FluxoError(f"{uri} (v{version.version}) was not exported by fluxo: no model.onnx with fluxo metadata")
        metadata["model_version"] = str(version.version)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    log.info("serving %s v%s from %s", name, version.version, target)
    return target


def model_root(root: Path, settings: FluxoSettings) -> Path:
    """The directory whose ``current.json`` names the live champion (serving/reload.py).

    ``fluxo serve`` starts the service on this root, and every promotion
    republishes it, so a running server switches to a new champion by itself.
    """
    return Path(root) / settings.serve.model_cache / settings.registered_model_name()


def publish_champion(root: Path, settings: FluxoSettings) -> Path:
    """Materialise the current champion and point the model root at it; returns its directory."""
    from serving.reload import publish

    model_dir = materialize_model(root, settings)
    publish(model_root(root, settings), model_dir)
    log.info("published %s as the live champion under %s", model_dir.name, model_root(root, settings))
    return model_dir
