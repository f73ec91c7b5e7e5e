"""A user's project and the installed `fluxo`, run in it as they type it: a fresh process each time.

In a process where MLflow, Prefect or torch is already imported (pytest's), import-time and
threading faults cannot show; a subprocess of the console script is what users run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests import waiting
from tests.conftest import REPO

FLUXO = Path(sys.executable).with_name("fluxo")


class Project:
    """A user's project directory, their HOME, and `fluxo` run there as they would type it."""

    @classmethod
    def clone_shaped(cls, base: Path) -> "Project":
        """``base/project`` shaped like a fresh clone (git, the presets, the ignore files) and ``base/home``."""
        root, home = base / "project", base / "home"
        home.mkdir()
        shutil.copytree(REPO / "configs", root / "configs")
        for name in (".gitignore", ".dvcignore"):
            shutil.copy(REPO / name, root / name)  # a clone ignores .fluxo/, data/ and the stores
        subprocess.run(["git", "init", "-q", str(root)], check=True)
        return cls(root, home)

    def __init__(self, root: Path, home: Path) -> None:
        self.root, self.home = root, home
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("FLUXO_", "MLFLOW_", "PREFECT_"))}
        self.env.update(HOME=str(home), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")

    def fluxo(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([str(FLUXO), *args], cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def start(self, *args: str) -> tuple[subprocess.Popen, Path]:
        """A long-running `fluxo` (a server) in a terminal of its own; its output goes to a file."""
        log = self.root.parent / f"{args[0]}-{time.monotonic_ns()}.log"
        with log.open("wb") as out:
            process = subprocess.Popen([str(FLUXO), *args], cwd=self.root, env=self.env, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        return process, log


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """A user's mistake: exit 2, no traceback, and the last line is the one `error:` line."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    return errors[0]


def wait_for(condition, what: str, timeout: float = 120.0, process: subprocess.Popen | None = None, detail=None):
    """:func:`tests.waiting.wait_for` for a server's answers: a refused connection is "not yet", and a
    server that exited ends the wait at once. ``detail``: what to show at the deadline."""
    def checked():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process exited with {process.returncode} while waiting for {what}")
        try:
            return condition()
        except (httpx.TransportError, OSError, ValueError):
            return None

    return waiting.wait_for(checked, what, timeout, interval=0.2, detail=detail)


def stop(process: subprocess.Popen) -> int:
    """SIGTERM, as kill, systemd and container runtimes stop a server; it must exit by itself."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
