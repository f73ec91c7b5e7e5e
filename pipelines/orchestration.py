"""The project's own Prefect server: started by the first command that runs a flow, reused by the next.

Prefect runs a flow against an API server. Without ``PREFECT_API_URL`` it starts a temporary
one for every command and stops it at the end: several seconds of every ``fluxo run`` went
to booting it (measured: an unchanged rerun spent most of its 10 s there). Instead each
project gets one server (state in ``.fluxo/prefect``, next to the project's other state),
started in the background on first use, while the command goes on with its imports, and
found again by every later command in well under a second.

A small keeper process (``python -m pipelines.orchestration keep``) owns the server: each
command holds a lease (a file named after its pid in ``.fluxo/prefect/leases``) while it
uses the server; once no lease has been held for ``orchestration.idle_minutes`` the keeper
stops the server and itself, so nothing lingers. ``fluxo prefect stop`` stops it at once,
``fluxo prefect status`` says where it is. With ``PREFECT_API_URL`` set nothing here starts:
that server is used. ``orchestration.prefect_server=temporary`` keeps Prefect's own way.

Only the standard library (and pipelines/live.py's pid check) is imported at module level: the keeper must start in a blink.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.live import process_alive

if TYPE_CHECKING:
    from pipelines.settings.orchestration import OrchestrationSettings

log = logging.getLogger(__name__)

HOME = Path(".fluxo") / "prefect"
"""The project's Prefect home, under the project root: its database, log, server record and leases."""
BOOT_TIMEOUT_S = 120.0
"""How long a command waits for a server that is booting (a busy 2-core machine can need a minute)."""
KEEPER_POLL_S = 2.0


def home(root: Path) -> Path:
    return Path(root).resolve() / HOME


def _record_path(root: Path) -> Path:
    return home(root) / "server.json"


def _healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def running_server(root: Path) -> dict[str, object] | None:
    """The record of this project's server if its keeper is alive (the server may still be booting)."""
    try:
        record = json.loads(_record_path(root).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and process_alive(int(record.get("keeper", 0))) else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_keeper(root: Path, idle_minutes: float) -> dict[str, object]:
    """Spawn the keeper (detached: it outlives this command) and return the record it will serve under."""
    folder = home(root)
    port = free_port()
    record = {"url": f"http://127.0.0.1:{port}/api", "port": port, "home": str(folder), "owner": "keeper"}
    command = [sys.executable, "-m", "pipelines.orchestration", "keep", str(Path(root).resolve()), str(port),
               str(idle_minutes)]
    with (folder / "keeper.log").open("ab") as keeper_log:
        keeper = subprocess.Popen(command, stdout=keeper_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True, cwd=folder)
    record["keeper"] = keeper.pid
    write_record(root, record)
    log.info("starting this project's Prefect server at %s (state in %s; reused by later commands, stopped after "
             "%.0f idle minutes or by `fluxo prefect stop`)", record["url"], folder, idle_minutes)
    return record


def write_record(root: Path, record: dict[str, object]) -> None:
    """Name the project's server (its URL and the pid that owns it), replaced atomically."""
    path = _record_path(root)
    staged = path.with_suffix(".json.tmp")
    staged.write_text(json.dumps(record))
    staged.replace(path)


def ensure_server(root: Path, idle_minutes: float) -> dict[str, object]:
    """This project's server record, starting the keeper if there is none; it may still be booting."""
    from pipelines.locks import exclusive_lock

    folder = home(root)
    (folder / "leases").mkdir(parents=True, exist_ok=True)
    with exclusive_lock(folder / "server.lock"):  # two commands at once start one server, not two
        return running_server(root) or _start_keeper(root, idle_minutes)


def wait_healthy(record: dict[str, object], timeout: float = BOOT_TIMEOUT_S) -> str:
    """The server's API URL once it answers; a keeper that died says where its log is."""
    from pipelines.errors import FluxoError

    url, deadline = str(record["url"]), time.monotonic() + timeout
    while not _healthy(url):
        if not process_alive(int(record["keeper"])):
            raise FluxoError(f"the project's Prefect server stopped while starting; its log is "
                             f"{Path(str(record['home'])) / 'server.log'}")
        if time.monotonic() > deadline:
            raise FluxoError(f"the project's Prefect server did not answer {url}/health within {timeout:.0f} s; "
                             f"its log is {Path(str(record['home'])) / 'server.log'}")
        time.sleep(0.1)
    return url


@contextlib.contextmanager
def lease(root: Path) -> Iterator[None]:
    """While this process uses the server, the keeper does not count it idle."""
    path = home(root) / "leases" / str(os.getpid())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _pointed_at(url: str) -> Iterator[None]:
    """Prefect read its settings on import: point this process (and the processes it starts) at ``url``."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before


@contextlib.contextmanager
def prefect_api(root: Path, settings: OrchestrationSettings,
                prepare: Callable[[], object] = lambda: None) -> Iterator[str | None]:
    """The Prefect API for the commands inside: ``PREFECT_API_URL``, else this project's server.

    ``prepare`` runs while a server that is not up yet boots (the flow's own imports), so the
    first command of a project waits for the slower of the two, not their sum. Yields the URL,
    or None under ``orchestration.prefect_server=temporary`` (Prefect's own temporary server,
    stopped before the block ends so the command's last line is its outcome).
    """
    given = os.environ.get("PREFECT_API_URL", "").strip()
    if given or settings.prefect_server == "temporary":
        prepare()
        try:
            yield given or None
        finally:
            if not given:
                stop_temporary_server()
        return
    record = ensure_server(root, settings.idle_minutes)
    with lease(root):
        prepare()
        url = wait_healthy(record)
        with _pointed_at(url):
            yield url


def stop_temporary_server() -> None:
    """Stop Prefect's temporary server now instead of at exit, so a run's last line is its outcome.

    Prefect keeps its temporary servers in ``SubprocessASGIServer._instances`` and stops them
    from an ``atexit`` hook; stopping twice is a no-op.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    servers = list(getattr(SubprocessASGIServer, "_instances", {}).values())
    if not servers:
        return
    # The run's logs and events still queued go to the server first; sent after it stopped they
    # would end the output with "Error logging to API".
    APILogWorker.drain_all(timeout=5)
    EventsWorker.drain_all(timeout=5)
    for server in servers:
        server.stop()


def stop_server(root: Path, timeout: float = 30.0) -> bool:
    """Stop this project's server and its keeper; False when none was running."""
    record = running_server(root)
    if record is None:
        return False
    keeper = int(record["keeper"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(keeper, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while process_alive(keeper) and time.monotonic() < deadline:
        time.sleep(0.1)
    return True


# ---- the keeper: `python -m pipelines.orchestration keep ROOT PORT IDLE_MINUTES` ----------------

def leases_held(root: Path) -> int:
    """How many live commands use the project's server now."""
    return _live_leases(home(root))


def _live_leases(folder: Path) -> int:
    held = 0
    for path in (folder / "leases").glob("*"):
        if path.name.isdigit() and process_alive(int(path.name)):
            held += 1
        else:
            path.unlink(missing_ok=True)  # a command that was killed outright leaves its lease behind
    return held


def server_command(port: int) -> list[str]:
    """``prefect server start`` on loopback, by this interpreter (the keeper's and ``fluxo schedule``'s own)."""
    return [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]


def server_env(folder: Path, port: int, scheduler_loop_seconds: float | None = None) -> dict[str, str]:
    """Its environment: state under ``folder``, no analytics, the UI told where its API is, our auth string."""
    env = {**os.environ, "PREFECT_HOME": str(folder), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           # Its UI shows the runs; on a port other than 4200 it must be told where its API is.
           "PREFECT_SERVER_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    env.pop("PREFECT_API_URL", None)
    if scheduler_loop_seconds is not None:
        env["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = str(scheduler_loop_seconds)
    if os.environ.get("PREFECT_API_AUTH_STRING"):  # a loopback port is still open to every local user
        env["PREFECT_SERVER_API_AUTH_STRING"] = os.environ["PREFECT_API_AUTH_STRING"]
    return env


def keep(root: Path, port: int, idle_minutes: float) -> int:
    """Run the server until it has been idle for ``idle_minutes`` or this keeper gets SIGTERM/SIGINT."""
    folder = home(root)
    stopping: list[int] = []

    def _stop(signum: int, frame: object) -> None:
        stopping.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _stop)
    with (folder / "server.log").open("ab") as server_log:
        server = subprocess.Popen(server_command(port), env=server_env(folder, port),
                                  stdout=server_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
    last_used = time.monotonic()
    try:
        while not stopping and server.poll() is None:
            if _live_leases(folder):
                last_used = time.monotonic()
            elif time.monotonic() - last_used > idle_minutes * 60:
                break
            time.sleep(KEEPER_POLL_S)
    finally:
        stop_group(server)
        clear_record(root, os.getpid())
    return 0


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM a server's process group, then SIGKILL what is left: nothing may keep the port."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def clear_record(root: Path, owner: int) -> None:
    """Remove the server record if ``owner`` still owns it (a newer server's record stays)."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads(_record_path(root).read_text()).get("keeper") == owner:
            _record_path(root).unlink()


if __name__ == "__main__" and sys.argv[1:2] == ["keep"]:
    sys.exit(keep(Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
