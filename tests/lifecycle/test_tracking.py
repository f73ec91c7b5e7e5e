"""Where MLflow points: each project's own store, however many a process configures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines.tracking import configure_mlflow
from tests.conftest import make_settings, store_client


def test_a_second_project_in_one_process_gets_its_own_store(tmp_path: Path) -> None:
    """MLflow writes its URIs into os.environ, which fluxo reads as the user's choice: it must not stick."""
    import mlflow

    stores = []
    for name in ("first", "second"):
        root = tmp_path / name / "project"
        root.mkdir(parents=True)
        settings = make_settings(root)
        uri = configure_mlflow(root, settings).uri
        assert uri == f"sqlite:///{tmp_path / name / 'mlflow.db'}"
        assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == (uri, uri)
        with mlflow.start_run() as run:
            mlflow.log_metric("x", 1.0)
        stores.append((tmp_path / name / "mlflow.db", run.info.run_id))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID"):
        assert name not in os.environ, f"{name} was left in the environment: {os.environ.get(name)}"
    for db, run_id in stores:
        assert store_client(db).get_run(run_id).data.metrics == {"x": 1.0}


def test_the_users_tracking_uri_still_wins_and_stays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = f"sqlite:///{tmp_path / 'chosen.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", chosen)
    root = tmp_path / "project"
    root.mkdir()
    assert configure_mlflow(root, make_settings(root)).uri == chosen
    assert os.environ["MLFLOW_TRACKING_URI"] == chosen


@pytest.mark.parametrize("chosen", [None, "true"])
def test_artifacts_come_through_the_proxy_unless_the_user_chose_presigned_urls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chosen: str | None
) -> None:
    """A proxying server with S3 behind it hands out the store's own URLs (http://minio:9000), which a
    client outside its network cannot reach: fluxo reads through the proxy, unless told otherwise."""
    from mlflow.environment_variables import MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD

    if chosen is None:
        monkeypatch.delenv(MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD.name, raising=False)
    else:
        monkeypatch.setenv(MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD.name, chosen)
    root = tmp_path / "project"
    root.mkdir()
    configure_mlflow(root, make_settings(root), experiment=False)
    assert MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD.get() is (chosen == "true")
