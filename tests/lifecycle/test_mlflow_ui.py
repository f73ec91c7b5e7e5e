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

from pipelines.context import open_run
from pipelines.data.ingest import ingest, version
from pipelines.release import export_run
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


@pytest.mark.slow  # half a minute or more: `make test-slow` (make test stays under 20 minutes)
def test_ui_shows_run_curves_plots_data_version_and_champion(project: Path, settings_for, tmp_path: Path) -> None:
    settings = settings_for("train.epochs=3")
    ingest(project, settings.data)
    data_version = version(project, settings.data)
    trained = train(open_run(project, settings), data_version)
    export_run(open_run(project, settings), trained.run_id)

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


# --- stopping the UI, and the experiment it opens on ------------------------------------------


def _descendants(pid: int) -> list:
    """Every process below ``pid`` (the MLflow server, its uvicorn workers, its job runner)."""
    psutil = pytest.importorskip("psutil")
    return psutil.Process(pid).children(recursive=True)


def _alive(processes: list) -> list:
    """Those still running; a zombie is gone as far as the port and the CPU are concerned."""
    import psutil

    def running(process) -> bool:
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return [p for p in processes if running(p)]


def _port_is_free(port: int) -> bool:
    """Nobody listens on it: a fresh listener can bind (SO_REUSEADDR only skips TIME_WAIT leftovers)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_sigterm_stops_the_ui_and_every_process_it_started(tmp_path: Path) -> None:
    """SIGTERM to fluxo's own process (not its group, as systemd or a shell's `kill` would send it)
    stops the server and all its workers: exit status 0, the port free, no process left."""
    port = _free_port()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = f"import sys\nfrom pipelines.ui import run_ui\nsys.exit(run_ui({uri!r}, '127.0.0.1', {port}))\n"
    ui = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait(f"http://127.0.0.1:{port}/health", ui, timeout=240)
        started = _descendants(ui.pid)
        assert started, "the MLflow server should run as a child of fluxo"
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=60) == 0
        assert not _alive(started), [p.cmdline() for p in _alive(started)]  # gone before fluxo returns
        assert _port_is_free(port)
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait(timeout=30)


STUBBORN = """
import signal, subprocess, sys, time
for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, signal.SIG_IGN)
if sys.argv[1:] == ["worker"]:
    open(sys.argv[0] + ".ready", "w").close()
else:
    subprocess.Popen([sys.executable, __file__, "worker"])
time.sleep(600)
"""


def test_a_server_that_ignores_the_stop_is_killed_with_all_its_workers(tmp_path: Path) -> None:
    """Ctrl+C (SIGINT) reaches the whole group; a server and worker deaf to it are SIGKILLed after the
    grace period, and fluxo still reports a normal stop. No MLflow here: a stand-in that ignores signals."""
    server = tmp_path / "server.py"
    server.write_text(STUBBORN)
    code = (
        "import sys\nimport pipelines.ui as ui\nui.STOP_TIMEOUT_S = 1.0\n"
        f"ui.ui_command = lambda host, port: [sys.executable, {str(server)!r}]\n"
        "sys.exit(ui.run_ui('sqlite://', '127.0.0.1', 0))\n"
    )
    ui = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "server.py.ready").exists():
            assert ui.poll() is None and time.monotonic() < deadline, "the stand-in server did not start"
            time.sleep(0.1)
        started = _descendants(ui.pid)
        assert len(started) == 2  # the stand-in server and its worker
        ui.send_signal(signal.SIGINT)
        assert ui.wait(timeout=120) == 0  # a ceiling for a busy machine: the grace period is 1 s
        assert not _alive(started), [p.cmdline() for p in _alive(started)]
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait(timeout=30)


def test_runs_url_opens_the_training_runs() -> None:
    from pipelines.ui import runs_url

    assert runs_url("127.0.0.1", 5000, "3") == "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
    assert runs_url("0.0.0.0", 5000) == "http://127.0.0.1:5000/#/?workflowType=machine_learning"


def test_fluxo_experiments_are_training_experiments(project: Path, settings_for) -> None:
    """A new experiment is tagged as a training one, an old untagged one gets the tag, a chosen kind stays."""
    import mlflow

    from pipelines.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, configure_mlflow

    assert EXPERIMENT_KIND == "custom_model_development"  # the UI's "Machine learning" kind
    settings = settings_for()
    experiment_id = configure_mlflow(project, settings).experiment_id
    assert mlflow.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND

    mlflow.MlflowClient().delete_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG)
    configure_mlflow(project, settings)
    assert mlflow.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND

    mlflow.MlflowClient().set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "genai_development")
    configure_mlflow(project, settings)
    assert mlflow.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == "genai_development"
