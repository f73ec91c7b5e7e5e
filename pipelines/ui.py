"""`fluxo ui`: the MLflow UI (or, with --prefect, Prefect's) as a child that never outlives us.

``mlflow ui`` starts a server that forks uvicorn workers (and, with job execution on,
a job runner). Killing only the process we started leaves those holding the port,
so the server runs in its own process group (its own session, in fact: it must not
get the terminal's Ctrl+C twice, nor keep it) and every stop goes to the whole group.

Only the standard library is imported here: this command must start in a blink,
and the MLflow server imports MLflow itself, in the child.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_TIMEOUT_S = 15.0  # uvicorn finishes its requests first; after this the group is SIGKILLed
POLL_S = 0.2
# MLflow 3.17's UI picks GenAI or classic pages from a browser-wide "workflow type" (default: genai),
# read from this query parameter before localStorage; see tracking.EXPERIMENT_KIND.
ML_WORKFLOW = "workflowType=machine_learning"


def ui_command(host: str, port: int) -> list[str]:
    """The MLflow UI, run by this interpreter (its virtualenv, its MLflow); its store comes in :func:`ui_env`."""
    return [sys.executable, "-m", "mlflow", "ui", "--host", host, "--port", str(port)]


def ui_env(uri: str) -> dict[str, str]:
    """The UI's environment: the store ``uri`` as ``MLFLOW_BACKEND_STORE_URI``, no client's credentials.

    Not ``--backend-store-uri``: a command line is anyone's to read (``ps``), and a store's URI
    may hold its password (postgresql://user:pw@host/db). The UI is no MLflow or Prefect client,
    so it gets neither's credentials.
    """
    from pipelines.secret_files import without_client_secrets

    return {**without_client_secrets(os.environ), "MLFLOW_BACKEND_STORE_URI": uri}


def runs_url(host: str, port: int, experiment_id: str | None = None) -> str:
    """Where to point the browser: the training runs, in the UI's machine-learning mode.

    A wildcard bind address is not something a browser can open, so it becomes loopback.
    """
    page = f"/experiments/{experiment_id}/runs" if experiment_id else "/"
    return f"{browser_url(host, port)}/#{page}?{ML_WORKFLOW}"


def browser_url(host: str, port: int) -> str:
    """``http://HOST:PORT`` as a browser can open it: a wildcard bind address becomes loopback."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}"


@dataclass
class _Stop:
    """The stop request a signal handler records, and the group it forwards it to."""

    pgid: int | None = None
    signum: int | None = None
    deadline: float = field(default=float("inf"))

    def request(self, signum: int, _frame: FrameType | None = None) -> None:
        """Signal handler: remember the first request, pass every one on to the group."""
        if self.signum is None:
            self.signum = signum
            self.deadline = time.monotonic() + STOP_TIMEOUT_S
        if self.pgid is not None:
            _signal_group(self.pgid, signum)


def _signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to the group; False once nobody is left in it."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:  # only a zombie leader left (macOS answers EPERM then)
        return True
    return True


@contextmanager
def _forwarding(stop: _Stop) -> Iterator[None]:
    """Route the stop signals to ``stop`` for the duration, then restore the old handlers.

    A signal already ignored (``nohup`` ignores SIGHUP, a background job SIGINT) stays
    ignored: the caller asked for that. Off the main thread handlers cannot be set, and
    the server is then only stopped when it ends by itself or the caller's wait ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(signum, stop.request)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _wait_leader(process: subprocess.Popen, stop: _Stop) -> int:
    """Wait for the server; once a stop was asked and its time is up, SIGKILL the group."""
    while True:
        try:
            return process.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            if time.monotonic() > stop.deadline:
                log.warning("the UI server did not stop within %.0f s; killing it", STOP_TIMEOUT_S)
                _signal_group(process.pid, signal.SIGKILL)
                stop.deadline = float("inf")


def _reap_group(pgid: int, timeout: float) -> None:
    """Wait until no process is left in the group (the workers outlive their parent briefly).

    SIGTERM first, so workers that lost their parent still shut down cleanly, SIGKILL
    for whoever is still there after ``timeout``.
    """
    if not _signal_group(pgid, signal.SIGTERM):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return
        time.sleep(POLL_S)
    log.warning("UI server processes still running after %.0f s; killing them", timeout)
    _signal_group(pgid, signal.SIGKILL)
    while _group_alive(pgid) and time.monotonic() < deadline + 5:
        time.sleep(POLL_S)


def _group_alive(pgid: int) -> bool:
    """Whether anyone is left in the group, after reaping those of them that are our children.

    Orphaned workers are adopted by PID 1; when that is us (``fluxo ui`` as a container's
    command) nobody else reaps them, and a zombie still counts as a group member.
    """
    try:
        while os.waitpid(-pgid, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
    return _signal_group(pgid, 0)


def exit_status(returncode: int) -> int:
    """A child killed by a signal reports ``-N``; a shell reports ``128 + N``."""
    return 128 - returncode if returncode < 0 else returncode


def prefect_ui_command(host: str, port: int) -> list[str]:
    """Prefect's server with its UI, by this interpreter, over the database of PREFECT_HOME."""
    return [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]


def prefect_ui_env(host: str, port: int) -> dict[str, str]:
    """The UI asks its API at PREFECT_SERVER_UI_API_URL, which Prefect sets for port 4200 only."""
    return {**os.environ, "PREFECT_SERVER_UI_API_URL": f"{browser_url(host, port)}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def prefect_home() -> str:
    """Where Prefect keeps its database when nothing says otherwise: the runs of `fluxo run` go there."""
    return os.environ.get("PREFECT_HOME") or os.path.join(os.path.expanduser("~"), ".prefect")


def run_ui(uri: str, host: str, port: int) -> int:
    """Serve the MLflow UI over ``uri`` until it ends or we are asked to stop (see :func:`run_server`)."""
    return run_server(ui_command(host, port), ui_env(uri))


def run_server(command: list[str], env: dict[str, str]) -> int:
    """Run a UI server until it ends or we are asked to stop.

    SIGTERM, SIGINT (Ctrl+C) and SIGHUP go to the server's whole process group; it
    gets ``STOP_TIMEOUT_S`` to finish before the group is killed. Returns 0 after a
    requested stop (however the server took it), else the server's own exit status.
    Either way nothing of it is left running, or holding the port, on return.
    """
    stop = _Stop()
    with _forwarding(stop):
        process = subprocess.Popen(command, env=env, start_new_session=True)
        stop.pgid = process.pid  # a new session's leader: its pid is the group id
        if stop.signum is not None:  # a signal came while the server was being started
            _signal_group(process.pid, stop.signum)
        try:
            returncode = _wait_leader(process, stop)
        finally:
            if process.poll() is None:  # our own wait was interrupted (an exception, not a signal)
                _signal_group(process.pid, signal.SIGTERM)
                _wait_leader(process, _Stop(deadline=time.monotonic() + STOP_TIMEOUT_S))
            _reap_group(process.pid, STOP_TIMEOUT_S)
    if stop.signum is not None:
        log.debug("UI server stopped on signal %d (exit status %d)", stop.signum, returncode)
        return 0
    return exit_status(returncode)


__all__ = ["browser_url", "exit_status", "prefect_home", "prefect_ui_command", "prefect_ui_env", "run_server", "run_ui",
           "runs_url", "ui_command", "ui_env"]
