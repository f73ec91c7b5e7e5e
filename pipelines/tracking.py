"""MLflow wiring shared by the steps: where the store is and which experiment a run joins."""

from __future__ import annotations

import logging
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipelines.errors import FluxoError
from pipelines.locks import exclusive_lock
from pipelines.redact import redact_uri
from pipelines.secret_files import load_mlflow_secrets
from pipelines.settings import FluxoSettings

log = logging.getLogger(__name__)


# MLflow 3 sorts experiments into kinds by this tag: "custom_model_development" is the UI's
# "Machine learning" (runs, metrics, models), "genai_development" its traces-first pages.
# The 3.17 UI takes the kind from a browser-wide switch instead (pipelines.ui.ML_WORKFLOW);
# the tag still records what fluxo experiments are, for UIs and clients that read it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


@dataclass(frozen=True)
class TrackingTarget:
    """Where MLflow now points: the store's URI and the experiment (``""`` for a registry reader)."""

    uri: str
    experiment_id: str


def configure_mlflow(root: Path, settings: FluxoSettings, *, experiment: bool = True) -> TrackingTarget:
    """Point MLflow at the configured store (SQLite under ``mlflow/`` by default) and experiment.

    Only the run context calls this (pipelines/context.py: once per command or flow run), never
    an import, so importing fluxo touches no store. The account comes from
    ``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD``, or the password's file, which
    MLflow reads on each request through fluxo's provider (pipelines/secret_files.py), set up here
    before any MLflow call. ``experiment=False`` is for readers of the registry (``fluxo serve``):
    they neither need an experiment nor may create one, since on a basic-auth server whoever
    creates the experiment manages it.
    """
    load_mlflow_secrets()
    os.environ.setdefault(PROXY_MULTIPART_DOWNLOAD, "false")
    os.environ.setdefault(SUPPRESS_RUN_LINKS, "true")
    with _environment_kept(_MLFLOW_WRITES):
        return TrackingTarget(*_point_mlflow(root, settings, experiment))


# MLflow writes what it is told into these (so that its subprocesses inherit it). fluxo reads
# MLFLOW_TRACKING_URI as the user's choice (FluxoSettings.resolved_tracking_uri), so a second
# project configured in the same process would silently get the first one's store.
_MLFLOW_WRITES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")


@contextmanager
def _environment_kept(names: tuple[str, ...]) -> Iterator[None]:
    """Undo what the block writes to ``names`` in ``os.environ`` (the process's own settings stay as they were)."""
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# An MLflow server that proxies an S3 artifact store advertises multipart downloads, and its
# clients then fetch every artifact through a presigned URL of the store itself (http://minio:9000
# in the compose stack), which only the server's own network reaches: `fluxo rollback` from a
# laptop hung on it. The proxy exists so that clients need no way into the store; unless the
# user turned it on, fluxo downloads through the proxy.
PROXY_MULTIPART_DOWNLOAD = "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"
# With a tracking server (not a local file), MLflow writes "View run ... at: URL" lines to stdout
# at the end of every run, where `fluxo run`, `export` and `monitor --json` print their results:
# against the compose stack's MLflow, `fluxo monitor --json` printed no parseable JSON. Unless the
# user asked for those lines, they stay off (the run is in the MLflow UI, and its id in the result).
SUPPRESS_RUN_LINKS = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


def _point_mlflow(root: Path, settings: FluxoSettings, experiment: bool) -> tuple[str, str]:
    import mlflow

    uri = settings.resolved_tracking_uri(Path(root))
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        artifacts: Path | None = db.parent / "artifacts"
    else:
        artifacts = None
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if not experiment:
        if artifacts is not None:  # a fresh SQLite store is still migrated once, under the lock
            with sqlite_store_lock(uri):
                mlflow.MlflowClient().search_registered_models(max_results=1)
        return uri, ""
    with sqlite_store_lock(uri):
        experiment_id = _ensure_experiment(settings.tracking.experiment, artifacts)
    mlflow.set_experiment(experiment_id=experiment_id)
    log.debug("MLflow tracking at %s, experiment %s", redact_uri(uri), settings.tracking.experiment)
    return uri, experiment_id


@contextmanager
def sqlite_store_lock(uri: str) -> Iterator[None]:
    """Hold ``<db>.lock`` while a SQLite store is first opened (a no-op for other stores).

    MLflow creates a new SQLite store by running its migrations on first open; two processes
    opening one fresh store at once (a scheduled run and ``fluxo serve``, two flow runs) both
    migrate and the second fails with ``table _alembic_tmp_tags already exists``. So the first
    open, and the experiment's creation, happen under the lock; once migrated, a later open
    finds every table and runs nothing.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    with exclusive_lock(Path(uri.removeprefix("sqlite:///") + ".lock")):
        yield


def _ensure_experiment(name: str, artifacts: Path | None) -> str:
    """The experiment's id, created (or tagged) as a training experiment if it is not yet one.

    An experiment made before fluxo tagged them gets the tag; one whose kind someone chose
    (in the UI, say) keeps it. A deleted experiment is left for ``set_experiment`` to refuse.
    """
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        # A local store keeps artifacts beside the database, not in ./mlruns of whatever the cwd is.
        return mlflow.create_experiment(
            name,
            artifact_location=artifacts.resolve().as_uri() if artifacts else None,
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
        )
    if EXPERIMENT_KIND_TAG not in experiment.tags and experiment.lifecycle_stage == "active":
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def registry_version(client: Any, uri: str) -> tuple[str, Any, str | None]:
    """(name, model version, alias or None) of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.

    Raises MLflow's exception when the registry has no such version; callers say what to do.
    """
    name, _, alias = uri.removeprefix("models:/").partition("@")
    if alias:
        return name, client.get_model_version_by_alias(name, alias), alias
    name, _, number = name.partition("/")
    return name, client.get_model_version(name, number), None


# What a refused request was trying to do, by the REST endpoint it called (MLflow's messages name
# only the endpoint); the first match wins.
_REFUSED_ACTIONS = (
    ("registered-models/alias", "move or remove an alias of a registered model"),
    ("model-versions/create", "register a model version"),
    ("registered-models/create", "create a registered model"),
    ("model-versions/set-tag", "tag a model version"),
    ("model-versions/delete-tag", "untag a model version"),
    ("registered-models/", "read or change the model registry"),
    ("model-versions/", "read or change the model registry"),
    ("experiments/create", "create an experiment"),
    ("runs/create", "start a run"),
    ("runs/", "read or write runs"),
    ("experiments/", "read or change experiments"),
    ("mlflow-artifacts/", "read or write artifacts"),
    ("logged-models", "read or write logged models"),
)


def is_refusal(error: BaseException) -> bool:
    """A 401 of MLflow: no account, an unknown one or a wrong password. Never read it as "no such thing".

    A 403 may be read so: basic-auth answers it to non-admins for a model that does not exist, too.
    """
    return getattr(error, "error_code", None) == "UNAUTHENTICATED"


def tracking_refusal(error: BaseException) -> FluxoError | None:
    """A 401/403 of the tracking server as a one-line FluxoError (which account, what it may not do), else None.

    Neither is ever retried: the same account gets the same answer. Cheap when MLflow was
    never imported (then no MLflow error can be in flight).
    """
    exceptions = sys.modules.get("mlflow.exceptions")
    seen: list[BaseException] = []
    item: BaseException | None = error
    while item is not None and item not in seen:
        seen.append(item)
        status = None
        if exceptions is not None and isinstance(item, exceptions.MlflowException):
            status = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}.get(item.error_code)
        response = getattr(item, "response", None)  # requests' HTTPError (artifact downloads)
        if status is None and getattr(response, "status_code", None) in (401, 403) and "mlflow" in str(
                getattr(response, "url", "")):
            status = response.status_code
        if status is not None:
            return _refusal(status, str(item))
        item = item.__cause__ or item.__context__
    return None


def _refusal(status: int, text: str) -> FluxoError:
    mlflow = sys.modules.get("mlflow")
    server = redact_uri(mlflow.get_tracking_uri() if mlflow is not None
                        else os.environ.get("MLFLOW_TRACKING_URI", "the server"))
    endpoint = re.search(r"(?:endpoint|url:?)\s+(\S+)", text)
    action = next((what for path, what in _REFUSED_ACTIONS if endpoint and path in endpoint.group(1)),
                  f"call {endpoint.group(1)}" if endpoint else "do this")
    account = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401:
        refused = (f"refused the account {account!r} (401: no such account, or a wrong password)" if account
                   else "wants an account (401)")
        return FluxoError(
            f"MLflow at {server} {refused}: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
            "MLFLOW_TRACKING_PASSWORD_FILE) to an account of that server (deploy/README.md, 'Accounts')")
    return FluxoError(
        f"MLflow at {server}: the account {account or '(none)'!r} may not {action} (403, permission denied, "
        "or no such resource: MLflow tells only admins which); use an account that may, or have an MLflow admin "
        "grant it (deploy/README.md, 'Accounts')")
