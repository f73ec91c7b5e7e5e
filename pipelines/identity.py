"""What a run is, read from the run itself: its dataset, data version and registry entry.

Later steps (export, registry, promotion) take these from the MLflow run, never from
whatever preset is on their command line, so an MNIST-1D run exported without
``--config`` still joins ``fluxo-mnist1d``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.errors import FluxoError

REGISTERED_MODEL_TAG = "fluxo.registered_model"


@dataclass(frozen=True)
class RunIdentity:
    run_id: str
    dataset: str
    data_version: str
    registered_model: str


def default_registered_model(explicit: str | None, dataset: str) -> str:
    """``tracking.registered_model`` when set, else one entry per dataset: only same-data models compete."""
    return explicit or f"fluxo-{dataset}"


def fetch_run(client: Any, run_id: str) -> Any:
    """The MLflow run, or a FluxoError that says where fluxo looked and how to find a real id."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as error:
        import mlflow

        raise FluxoError(
            f"--run-id {run_id}: no such run in the tracking store {mlflow.get_tracking_uri()} "
            f"({error.error_code}); omit --run-id to take the newest run, or look the id up with `fluxo ui`"
        ) from None


def run_identity(run: Any) -> RunIdentity:
    """The identity a training run recorded; a run without it was not made by `fluxo train`."""
    tags = run.data.tags
    missing = [tag for tag in ("dataset", "data_version") if not tags.get(tag)]
    if missing:
        raise FluxoError(
            f"run {run.info.run_id} has no {' or '.join(missing)} tag: it was not recorded by `fluxo train`; "
            "export a run that fluxo trained"
        )
    name = tags.get(REGISTERED_MODEL_TAG) or default_registered_model(None, tags["dataset"])
    return RunIdentity(run.info.run_id, tags["dataset"], tags["data_version"], name)
