"""Shared fixtures: every store (DVC repo and remote, MLflow, checkpoints) lives in tmp_path."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pipelines.settings import FluxoSettings, load_settings

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


def need(available: object, what: str) -> None:
    """A test's requirement from outside the project: skipped where it is missing, saying what to
    install, except in CI (``CI`` set, as .ci/run sets it), where a missing tool fails the test, so
    that CI can never pass by skipping what it was meant to run."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI lacks {what}")
    pytest.skip(f"needs {what}")


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's MLFLOW_TRACKING_URI or FLUXO_* must never leak into a test's stores."""
    import os

    for key in list(os.environ):
        if key.startswith("FLUXO_") or key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # A test's project keeps its Prefect server (pipelines/orchestration.py) for minutes, not half an hour.
    monkeypatch.setenv("FLUXO_ORCHESTRATION__IDLE_MINUTES", "5")


@pytest.fixture(autouse=True, scope="module")
def _stop_project_prefect_servers(tmp_path_factory: pytest.TempPathFactory):
    """Each module's projects' Prefect servers stop with the module: nothing a test started outlives the run."""
    yield
    from pipelines.orchestration import HOME, stop_server

    for record in Path(tmp_path_factory.getbasetemp()).glob(f"**/{HOME}/server.json"):
        stop_server(record.parents[len(HOME.parts)])


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """An empty git repository standing in for a fresh clone of a user's project."""
    root = tmp_path / "project"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    return root


def make_settings(root: Path, *overrides: str, config: Path | None = SMOKE) -> FluxoSettings:
    """Settings with every store under ``root``'s parent (tmp_path), plus overrides."""
    stores = root.parent
    return load_settings(
        config,
        [
            f"data.dvc_remote={stores / 'dvc-remote'}",
            f"tracking.tracking_uri=sqlite:///{stores / 'mlflow.db'}",
            *overrides,
        ],
    )


@pytest.fixture
def settings_for(project: Path):
    def build(*overrides: str, config: Path | None = SMOKE) -> FluxoSettings:
        return make_settings(project, *overrides, config=config)

    return build


def store_client(db: Path):
    """A client on one SQLite store for both runs and the registry.

    ``MlflowClient(tracking_uri)`` alone takes the registry from ``mlflow.set_registry_uri``,
    which is process-global: an earlier test's store would answer the registry queries.
    """
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import sqlite_store_lock

    uri = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with sqlite_store_lock(uri):  # a store fluxo is creating right now is opened once it is migrated
        client.search_experiments(max_results=1)
    return client
