"""MLflow wiring shared by the steps: where the store is and which experiment a run joins."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pipelines.locks import exclusive_lock
from pipelines.settings import FluxoSettings

log = logging.getLogger(__name__)


# MLflow 3 sorts experiments into kinds by this tag: "custom_model_development" is the UI's
# "Machine learning" (runs, metrics, models), "genai_development" its traces-first pages.
# The 3.17 UI takes the kind from a browser-wide switch instead (pipelines.ui.ML_WORKFLOW);
# the tag still records what fluxo experiments are, for UIs and clients that read it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def configure_mlflow(root: Path, settings: FluxoSettings) -> str:
    """Point MLflow at the configured store (SQLite under ``mlflow/`` by default) and experiment.

    Called by each step rather than on import, so importing fluxo never touches a store.
    """
    return _configure(root, settings)[0]


def configure_experiment(root: Path, settings: FluxoSettings) -> str:
    """:func:`configure_mlflow`, answering the experiment's id (``fluxo ui`` links to its runs)."""
    return _configure(root, settings)[1]


def _configure(root: Path, settings: FluxoSettings) -> tuple[str, str]:
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
    with sqlite_store_lock(uri):
        experiment_id = _ensure_experiment(settings.tracking.experiment, artifacts)
    mlflow.set_experiment(experiment_id=experiment_id)
    log.debug("MLflow tracking at %s, experiment %s", uri, settings.tracking.experiment)
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
