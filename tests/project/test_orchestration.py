"""The project's Prefect server (pipelines/orchestration.py): started by the first flow run, reused by the next,
stopped by `fluxo prefect stop` or after its idle minutes, as users run it: the installed `fluxo`, fresh processes."""

from __future__ import annotations

import json

import psutil
import pytest

from tests.users import Project
from tests.waiting import wait_for

SMOKE = "configs/smoke.yaml"
STARTING = "starting this project's Prefect server"


def _json(result) -> dict:
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return json.loads(result.stdout[result.stdout.index("{"):])


def _server_processes(keeper: int) -> list[psutil.Process]:
    try:
        keeper_process = psutil.Process(keeper)
        return [keeper_process, *keeper_process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Project:
    return Project.clone_shaped(tmp_path_factory.mktemp("orchestration"))


@pytest.mark.slow  # 28 s: three whole runs; make test's first-hour tests start the embedded server too
def test_the_first_run_starts_the_server_the_next_reuses_it_and_stop_leaves_nothing(user: Project) -> None:
    assert _json(user.fluxo("prefect", "status"))["project_server"] is False
    first = user.fluxo("run", "--config", SMOKE)
    assert _json(first)["unchanged"] is False
    assert STARTING in first.stderr, first.stderr[-3000:]
    status = _json(user.fluxo("prefect", "status"))
    assert status["project_server"] is True and status["api_url"].startswith("http://127.0.0.1:"), status
    assert str(user.root / ".fluxo" / "prefect") == status["home"]

    again = user.fluxo("run", "--config", SMOKE)
    assert _json(again)["unchanged"] is True
    assert STARTING not in again.stderr, again.stderr[-3000:]
    assert status["api_url"].removesuffix("/api") in again.stderr, "the rerun's flow run is on the same server"
    assert _json(user.fluxo("prefect", "status"))["keeper_pid"] == status["keeper_pid"]

    processes = _server_processes(status["keeper_pid"])
    assert any("prefect" in " ".join(p.cmdline()) for p in processes), [p.cmdline() for p in processes]
    stopped = user.fluxo("prefect", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    assert _json(user.fluxo("prefect", "status"))["project_server"] is False
    assert "no Prefect server runs" in user.fluxo("prefect", "stop").stdout


@pytest.mark.slow
def test_an_idle_server_stops_by_itself_and_temporary_keeps_prefects_own(user: Project) -> None:
    user.env["FLUXO_ORCHESTRATION__IDLE_MINUTES"] = "0.05"  # 3 s
    try:
        assert _json(user.fluxo("run", "--config", SMOKE))["unchanged"] in (True, False)
        keeper = _json(user.fluxo("prefect", "status"))["keeper_pid"]
        processes = _server_processes(keeper) if keeper else []
        wait_for(lambda: not any(p.is_running() for p in processes), "the idle server to stop", timeout=90)
        assert _json(user.fluxo("prefect", "status"))["project_server"] is False
    finally:
        del user.env["FLUXO_ORCHESTRATION__IDLE_MINUTES"]
    temporary = user.fluxo("run", "--config", SMOKE, "--set", "orchestration.prefect_server=temporary")
    assert _json(temporary)["unchanged"] is True
    assert STARTING not in temporary.stderr and "Starting temporary server" in temporary.stderr, temporary.stderr[-3000:]
    assert _json(user.fluxo("prefect", "status"))["project_server"] is False
