"""Every command the README shows, pasted as shown, in a fresh copy of the project.

Each ```bash block of README.md is preceded by a comment that says, for each of its
command lines in order, how a user runs it:

    <!-- readme-test: run | serve http://127.0.0.1:3000/readyz | skip: why -->

- ``run``: in the foreground, as pasted; it must exit 0. Lines of one terminal share
  their environment (``source .venv/bin/activate`` carries over to the next line).
- ``serve URL``: it runs until stopped (a server), as in a terminal of its own; the walk
  goes on once ``GET URL`` answers 200. It is stopped with Ctrl-C (SIGINT to its process
  group) when the next server starts, or at the end; it must then exit 0 and leave no
  process behind.
- ``skip: why``: not run here, and why (another test runs it, or it needs what CI lacks).

A block without the comment, or with a directive too few or too many, is refused by
:func:`walk_plan`, so a command added to the README is either run or explicitly left out.
Run as ``python -m tests.readme_walk`` or through ``tests/project/test_readme.py`` (``make test-readme``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SERVE_TIMEOUT_S = 900.0  # `make run` builds the environment first: minutes on a fresh machine
RUN_TIMEOUT_S = 1800.0
STOP_TIMEOUT_S = 60.0

_BLOCK = re.compile(r"(?:<!--\s*readme-test:(?P<directives>.*?)-->\s*\n)?```bash\n(?P<body>.*?)```", re.S)


@dataclass(frozen=True)
class Step:
    """One README command line and how the walk runs it."""

    command: str
    how: str  # run | serve | skip
    detail: str  # the readiness URL of a server, or why a line is skipped
    line: int  # where in README.md, for the failure message


def command_lines(body: str) -> list[str]:
    """A block's commands: its non-empty lines that are not comments (a trailing ``\\`` joins lines)."""
    joined = body.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def walk_plan(text: str) -> list[Step]:
    """Every command of every bash block in ``text`` with its directive; a mistake names the block's line."""
    steps: list[Step] = []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("body"))
        directives = match.group("directives")
        commands = command_lines(match.group("body"))
        if directives is None:
            raise ValueError(f"README.md:{line}: a bash block without a `<!-- readme-test: ... -->` comment")
        parts = [part.strip() for part in directives.split("|")]
        if len(parts) != len(commands):
            raise ValueError(f"README.md:{line}: {len(commands)} commands but {len(parts)} readme-test directives")
        for command, part in zip(commands, parts):
            how, _, detail = part.partition(" ")
            how = how.rstrip(":")
            if how not in ("run", "serve", "skip") or (how != "run" and not detail.strip()):
                raise ValueError(f"README.md:{line}: {part!r}: expected run, serve URL or skip: why")
            steps.append(Step(command, how, detail.strip(), line))
    return steps


def _wait_ok(url: str, process: subprocess.Popen, step: Step) -> None:
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"README.md:{step.line}: `{step.command}` exited with {process.returncode} "
                                 f"before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"README.md:{step.line}: `{step.command}`: {url} not answering after {SERVE_TIMEOUT_S:.0f} s")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ctrl_c(process: subprocess.Popen, step: Step) -> None:
    """Ctrl-C in its terminal: SIGINT to the group; it must exit 0 and leave nobody in the group."""
    os.killpg(process.pid, signal.SIGINT)
    try:
        code = process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"README.md:{step.line}: `{step.command}` still running {STOP_TIMEOUT_S:.0f} s "
                             "after Ctrl-C") from None
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _group_alive(process.pid)
    if left:
        os.killpg(process.pid, signal.SIGKILL)
    # make passes Ctrl-C on to its recipe, waits for it, then ends itself by SIGINT ("make: *** Interrupt"),
    # as any make target does; whatever it ran must still have stopped cleanly, which the group check sees.
    stopped = (0, -signal.SIGINT, 128 + signal.SIGINT) if step.command.startswith("make ") else (0,)
    assert code in stopped, f"README.md:{step.line}: `{step.command}` exited {code} after Ctrl-C"
    assert not left, f"README.md:{step.line}: `{step.command}` left processes running after Ctrl-C"


def _run(command: str, cwd: Path, env_file: Path, log: Path, env: dict[str, str] | None) -> None:
    """One line in the foreground terminal, whose environment is kept in ``env_file`` between lines."""
    script = f"set -e\n[ -f {env_file} ] && . {env_file}\n{command}\nexport -p > {env_file}\n"
    with log.open("ab") as out:
        out.write(f"\n$ {command}\n".encode())
        out.flush()
        subprocess.run(["bash", "-c", script], cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=True,
                       timeout=RUN_TIMEOUT_S, start_new_session=True, env=env)


def walk(project: Path, log: Path, env: dict[str, str] | None = None) -> list[str]:
    """Run the README's plan in ``project`` (a fresh copy) with ``env``; returns what was skipped and why."""
    env_file = project.parent / "terminal.env"
    skipped: list[str] = []
    server: tuple[subprocess.Popen, Step] | None = None
    try:
        for step in walk_plan((project / "README.md").read_text(encoding="utf-8")):
            if step.how == "skip":
                skipped.append(f"{step.command}  ({step.detail})")
                continue
            if step.how == "run":
                try:
                    _run(step.command, project, env_file, log, env)
                except subprocess.CalledProcessError as error:
                    raise AssertionError(f"README.md:{step.line}: `{step.command}` exited {error.returncode}; "
                                         f"see {log}") from None
                continue
            if server is not None:
                _ctrl_c(*server)
            with log.open("ab") as out:
                out.write(f"\n$ {step.command}   # a terminal of its own\n".encode())
                script = f"[ -f {env_file} ] && . {env_file}\nexec {step.command}\n"
                process = subprocess.Popen(["bash", "-c", script], cwd=project, stdout=out, stderr=subprocess.STDOUT,
                                           env=env, start_new_session=True)
            server = (process, step)
            _wait_ok(step.detail, process, step)
        if server is not None:
            _ctrl_c(*server)
            server = None
    finally:
        if server is not None and server[0].poll() is None:  # a step failed: stop it as a user would, then kill
            os.killpg(server[0].pid, signal.SIGINT)
            try:
                server[0].wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(server[0].pid, signal.SIGKILL)
    return skipped


def fresh_copy(target: Path) -> Path:
    """The project as a clone would hold it: tracked and not-ignored files only (no .venv, data, stores)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if not source.is_file():
            continue  # deleted in the working tree
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(source.read_bytes())
        destination.chmod(source.stat().st_mode)
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)
    return target


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        copy = fresh_copy(Path(scratch) / "fluxo")
        print("\n".join(f"skipped: {line}" for line in walk(copy, Path(scratch) / "walk.log")))
        sys.stdout.write(Path(scratch, "walk.log").read_text(errors="replace")[-5000:])
