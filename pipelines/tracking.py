"""MLflow wiring shared by the steps: where the store is and which experiment a run joins."""

from __future__ import annotations

import logging
from pathlib import Path

from pipelines.settings import FluxoSettings

log = logging.getLogger(__name__)


def configure_mlflow(root: Path, settings: FluxoSettings) -> str:
    """Point MLflow at the configured store (SQLite under ``mlflow/`` by default) and experiment.

    Called by each step rather than on import, so importing fluxo never touches a store.
    """
    import mlflow

    uri = settings.resolved_tracking_uri(Path(root))
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        artifacts = db.parent / "artifacts"
    else:
        artifacts = None
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if mlflow.get_experiment_by_name(settings.tracking.experiment) is None:
        # A local store keeps artifacts beside the database, not in ./mlruns of whatever the cwd is.
        mlflow.create_experiment(
            settings.tracking.experiment, artifact_location=artifacts.resolve().as_uri() if artifacts else None
        )
    mlflow.set_experiment(settings.tracking.experiment)
    log.debug("MLflow tracking at %s, experiment %s", uri, settings.tracking.experiment)
    return uri
