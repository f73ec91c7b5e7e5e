"""A blocking, inter-process lock on a file: for first-time setup that two fluxo processes may race on.

Two processes of one project often start together (the ranks of a ``torchrun``, a scheduled
run beside a manual one, a server beside a flow) and both set up the same thing: DVC's
config and cache, a fresh SQLite store's migrations. Each such step holds this lock, so the
second process waits and then finds the work done. The kernel drops a ``flock`` when its
holder dies, however it dies: there is never a stale lock to remove by hand.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock; the steps run unguarded.
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) while the block runs, waiting for it if held."""
    if fcntl is None:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        log.debug("holding %s", path)
        yield  # closing the file releases the lock
