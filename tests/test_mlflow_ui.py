"""`fluxo ui` serves the MLflow UI over the local store: the run, its curves, plots and data version,
and the registered model with its champion alias, read back through the UI server's own HTTP API."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pipelines.data.ingest import ingest, version
from pipelines.export.step import export_run
from pipelines.train.run import train

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the MLflow UI exited early"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def test_ui_shows_run_curves_plots_data_version_and_champion(project: Path, settings_for, tmp_path: Path) -> None:
    settings = settings_for("train.epochs=3")
    ingest(project, settings.data)
    data_version = version(project, settings.data)
    trained = train(project, settings, data_version)
    export_run(project, settings, trained.run_id)

    port = _free_port()
    env = {"MLFLOW_TRACKING_URI": settings.tracking.tracking_uri, "PATH": str(Path(sys.executable).parent)}
    ui = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "ui", "--port", str(port), "--root", str(project)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(f"{base}/health", ui)
        assert "<html" in httpx.get(base, timeout=10).text.lower()
        api = f"{base}/api/2.0/mlflow"
        run = httpx.get(f"{api}/runs/get", params={"run_id": trained.run_id}, timeout=10).json()["run"]
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["data_version"] == data_version.md5
        assert {m["key"] for m in run["data"]["metrics"]} >= {"test_accuracy", "test_f1_macro", "val_loss"}
        history = httpx.get(
            f"{api}/metrics/get-history", params={"run_id": trained.run_id, "metric_key": "val_accuracy"}, timeout=10
        ).json()["metrics"]
        assert len(history) == 3
        plots = httpx.get(f"{api}/artifacts/list", params={"run_id": trained.run_id, "path": "plots"}, timeout=10).json()
        assert "plots/confusion_matrix.png" in {f["path"] for f in plots["files"]}
        png = httpx.get(
            f"{base}/get-artifact", params={"path": "plots/confusion_matrix.png", "run_uuid": trained.run_id}, timeout=10
        )
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
        model = httpx.get(f"{api}/registered-models/get", params={"name": "fluxo-digits"}, timeout=10).json()
        aliases = {a["alias"]: a["version"] for a in model["registered_model"]["aliases"]}
        assert aliases == {"champion": "1"}
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
