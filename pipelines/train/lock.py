"""One training process per run: an advisory lock in the run's checkpoint directory.

A run's checkpoints and MLflow run must have a single writer. The process that trains
a run (a fresh ``fluxo train`` or a ``--resume``) holds an exclusive ``flock`` on
``<checkpoint_dir>/train.lock`` for as long as it trains; a resume that finds it held
is refused instead of writing into the same states as the live process. The kernel
drops the lock when its holder dies, however it dies, so a crashed run can always be
resumed: no stale lock to clean up by hand. The file itself is left behind, unlocked.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from pipelines.errors import FluxoError

try:
    import fcntl
except ImportError:  # Windows: no flock; training goes on unguarded.
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"


def lock_path(checkpoint_dir: Path) -> Path:
    """Where a run's lock lives: beside its ``state/`` and ``best.pt``."""
    return Path(checkpoint_dir) / LOCK_NAME


def _holder(path: Path) -> str:
    """The pid the holder wrote into the lock file, for the error message (it may not be written yet)."""
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid else "another process"


def _acquire(handle: IO[str], path: Path, run_id: str) -> None:
    """Take the lock without waiting; a held lock means a live trainer, so refuse and say what to do."""
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise FluxoError(
            f"run {run_id} is still being trained by {_holder(path)} (it holds {path}); "
            "wait for it to finish, or stop that process, then run `fluxo train --resume` again"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()


@contextmanager
def training_lock(checkpoint_dir: Path, run_id: str) -> Iterator[Path]:
    """Hold run ``run_id``'s lock while the block runs; raise :class:`FluxoError` if another process holds it.

    Call it from rank 0 (or the single process) only: the lock names the run's one writer.
    """
    path = lock_path(checkpoint_dir)
    if fcntl is None:
        log.warning("no fcntl on this platform: %s is not locked against a concurrent resume", path)
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:  # "a+": never truncate a holder's pid before locking
        _acquire(handle, path, run_id)
        log.debug("holding %s for run %s", path, run_id)
        yield path  # closing the file releases the lock
