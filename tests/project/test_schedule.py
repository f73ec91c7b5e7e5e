"""`fluxo schedule` as a user starts it: nothing else running, a run within two minutes, a clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import SMOKE, store_client

pytestmark = pytest.mark.e2e


@pytest.fixture
def real_prefect_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`prefect server start` on loopback, as the compose stack runs it, with a quick scheduler."""
    from pipelines.scheduling import scheduling_server

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with scheduling_server(tmp_path / "prefect-server-home", scheduler_loop_seconds=5) as url:
        yield url


# A minute and a half each (a real schedule's tick); `make test-slow` runs both, and the compose stack's worker
# runs the same path at every fresh start (`make test-stack`).
@pytest.mark.slow
@pytest.mark.parametrize("server", ["started by fluxo", "PREFECT_API_URL"])
def test_schedule_runs_the_pipeline_and_stops_with_everything_it_started(
    project: Path, tmp_path: Path, server: str, request: pytest.FixtureRequest
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = "5"  # the scheduler looks every 5 s, not every 60
    if server == "PREFECT_API_URL":
        env["PREFECT_API_URL"] = request.getfixturevalue("real_prefect_server")
    db = tmp_path / "mlflow.db"
    fluxo = Path(sys.executable).with_name("fluxo")
    log_path = tmp_path / "schedule.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [str(fluxo), "schedule", "--cron", "* * * * *", "--root", str(project), "--config", str(SMOKE),
             "--set", "train.epochs=1", "--set", f"data.dvc_remote={tmp_path / 'dvc-remote'}",
             "--set", f"tracking.tracking_uri=sqlite:///{db}"],
            cwd=project, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline, versions = time.monotonic() + 150, []
        while time.monotonic() < deadline and not versions:
            assert process.poll() is None, log_path.read_text()[-3000:]
            time.sleep(3)
            if db.exists():
                try:
                    versions = store_client(db).search_model_versions("name='fluxo-digits'")
                except Exception:  # noqa: BLE001 - the store may be mid-creation
                    versions = []
        assert versions, "no scheduled run registered a model within 150 s:\n" + log_path.read_text()[-3000:]
        started = psutil.Process(process.pid).children(recursive=True)
        starts_a_server = server == "started by fluxo"
        assert any("prefect" in " ".join(p.cmdline()) and "server" in p.cmdline() for p in started) == starts_a_server
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log_path.read_text()[-3000:]
        _, alive = psutil.wait_procs(started, timeout=20)
        assert not alive, f"left running after SIGTERM: {[p.cmdline() for p in alive]}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    said = log_path.read_text()
    assert ("started a Prefect server with its scheduler" in said) == (server == "started by fluxo")
    assert server == "started by fluxo" or "scheduling against the Prefect server at" in said


# A minute of a real schedule; the compose stack's worker runs the same path at every fresh start (make test-stack).
@pytest.mark.slow
def test_run_if_no_champion_trains_the_first_model_now_not_at_the_first_tick(project: Path, tmp_path: Path) -> None:
    """The compose worker's start on a fresh stack: the cron is a year away, the champion comes at once;
    started again with a champion in the registry, it waits for the cron."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    db = tmp_path / "mlflow.db"
    command = [str(Path(sys.executable).with_name("fluxo")), "schedule", "--cron", "0 3 1 1 *", "--run-if-no-champion",
               "--root", str(project), "--config", str(SMOKE), "--set", "train.epochs=1",
               "--set", f"data.dvc_remote={tmp_path / 'dvc-remote'}", "--set", f"tracking.tracking_uri=sqlite:///{db}"]

    def start(log_path: Path) -> subprocess.Popen:
        with log_path.open("wb") as log_file:
            return subprocess.Popen(command, cwd=project, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def stop(process: subprocess.Popen, log_path: Path) -> str:
        try:
            process.send_signal(signal.SIGTERM)
            assert process.wait(60) == 0, log_path.read_text()[-3000:]
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        return log_path.read_text()

    first_log = tmp_path / "first.log"
    process = start(first_log)
    try:
        deadline, champion = time.monotonic() + 180, None
        while time.monotonic() < deadline and champion is None:
            assert process.poll() is None, first_log.read_text()[-3000:]
            time.sleep(2)
            try:
                champion = store_client(db).get_model_version_by_alias("fluxo-digits", "champion") if db.exists() else None
            except Exception:  # noqa: BLE001 - no such model or alias yet, or the store mid-creation
                champion = None
        assert champion is not None, "no champion within 180 s:\n" + first_log.read_text()[-3000:]
    finally:
        said = stop(process, first_log)
    assert "no champion yet: started pipeline run" in said

    second_log = tmp_path / "second.log"
    process = start(second_log)
    deadline = time.monotonic() + 90
    while "being served and polling" not in second_log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, second_log.read_text()[-3000:]
        time.sleep(1)
    said = stop(process, second_log)
    assert "no champion yet" not in said
    assert [str(v.version) for v in store_client(db).search_model_versions("name='fluxo-digits'")] == ["1"]
