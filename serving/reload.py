"""Which model directory is live: a pointer file that a publisher swaps atomically.

``FLUXO_MODEL_DIR`` may name a model directory (``model.onnx`` + ``metadata.json``),
served as is for the server's lifetime, or a *model root*::

    <model_root>/
      current.json     {"model_dir": "../fluxo-digits-v3", "published_at": "..."}

whose ``current.json`` names the live directory (relative to the root, or
absolute). :func:`publish` rewrites the pointer with an atomic rename, so a reader
sees the old pointer or the new one, never half of one; the running service
checks it every ``FLUXO_RELOAD_INTERVAL_S`` and swaps models between requests.
A file rather than a registry query keeps ``serving`` free of MLflow and works
the same on a shared volume in a container.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from serving import ServingError
from serving.contract import METADATA_FILE, MODEL_FILE, is_model_dir, read_model_dir

POINTER_FILE = "current.json"


def read_pointer(model_root: Path | str) -> Path:
    """The directory ``model_root/current.json`` names, resolved against the root."""
    pointer = Path(model_root) / POINTER_FILE
    try:
        data = json.loads(pointer.read_text(encoding="utf-8"))
        target = data["model_dir"]
        if not isinstance(target, str) or not target:
            raise TypeError("model_dir must be a non-empty string")
    except FileNotFoundError:
        raise ServingError(f"{pointer}: no such file; publish a model with serving.reload.publish()") from None
    except (ValueError, KeyError, TypeError) as error:
        raise ServingError(
            f'{pointer}: expected {{"model_dir": "<path>"}} ({error}); rewrite it with serving.reload.publish()'
        ) from error
    return (Path(model_root) / target).resolve()


def resolve_model_dir(path: Path | str) -> Path:
    """The live model directory for ``FLUXO_MODEL_DIR``: the pointer's target, or ``path`` itself."""
    path = Path(path)
    if (path / POINTER_FILE).is_file():
        return read_pointer(path)
    return path


def is_model_root(path: Path | str) -> bool:
    """True when ``path`` is a model root (has ``current.json``), so the server watches it."""
    return (Path(path) / POINTER_FILE).is_file()


def publish(model_root: Path | str, model_dir: Path | str) -> Path:
    """Make ``model_dir`` the live model of every server started on ``model_root``; returns the pointer.

    The directory is checked first (both files present, metadata readable), the
    pointer is written to a temporary file in the root and renamed over
    ``current.json``. Servers pick it up within ``FLUXO_RELOAD_INTERVAL_S``, load
    and warm the new model beside the old one, and switch between requests; a
    directory they cannot load is logged, counted and retried with backoff (:class:`PointerWatcher`),
    and the old model keeps serving meanwhile.
    Publishing the directory already live is a no-op for the servers.
    """
    model_root = Path(model_root)
    model_dir = Path(model_dir).resolve()
    if not is_model_dir(model_dir):
        raise ServingError(f"{model_dir}: not a model directory (needs {MODEL_FILE} and {METADATA_FILE})")
    read_model_dir(model_dir)
    model_root.mkdir(parents=True, exist_ok=True)
    root = model_root.resolve()
    try:
        target = os.path.relpath(model_dir, root)
    except ValueError:  # another drive on Windows
        target = str(model_dir)
    body = json.dumps(
        {"model_dir": target, "published_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2
    )
    fd, tmp = tempfile.mkstemp(prefix=".current.", suffix=".tmp", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(body + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, root / POINTER_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return root / POINTER_FILE


RETRIES = 5
"""Loads of one publish retried after a failure, each after twice as many polls as the last (1, 2, 4, 8, 16
intervals: about a minute at the default 2 s), before it waits for the next publish: a half-synced volume
or a copy still arriving settles well within that, and a directory that is plainly broken stops costing loads."""


class PointerWatcher:
    """Tells when a model root's pointer names a different directory; cheap to call often (one stat).

    A publish counts as seen only once its directory loaded (:meth:`accept`): a load that failed
    (:meth:`failed`) is tried again with backoff, so a transient fault (a half-synced volume, a
    pointer read mid-copy) heals without another publish, and :data:`RETRIES` bounds it.
    """

    def __init__(self, model_root: Path | str, current: Path | str, retries: int = RETRIES) -> None:
        self.pointer = Path(model_root) / POINTER_FILE
        self.current = Path(current).resolve()
        self.retries = retries
        # Not the pointer's signature now: it may have moved while ``current`` was loading and
        # warming up (a publish during start), and that move must not pass for the one loaded.
        # The first poll reads the pointer and compares its target with ``current``.
        self._seen: tuple[int, int, int] | None = None
        self._trying: tuple[int, int, int] | None = None  # the publish being loaded (or retried)
        self._failures = 0
        self._skip = 0  # polls left before the next try

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            stat = self.pointer.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def poll(self) -> Path | None:
        """The newly published directory to load, or None when there is nothing (new) to try now.

        An unreadable pointer is a ServingError; report it with :meth:`failed` like a failed load.
        """
        signature = self._signature()
        if signature is None or signature == self._seen:
            return None
        if signature != self._trying:  # a new publish: try it now, whatever the last one's backoff
            self._trying, self._failures, self._skip = signature, 0, 0
        elif self._skip > 0:
            self._skip -= 1
            return None
        target = read_pointer(self.pointer.parent)
        if target == self.current:
            self._seen = signature
            return None
        return target

    def accept(self, model_dir: Path | str) -> None:
        """Record ``model_dir`` as live (after it loaded), so publishing it again changes nothing."""
        self.current = Path(model_dir).resolve()
        self._seen, self._failures, self._skip = self._trying, 0, 0

    def failed(self) -> int | None:
        """Record that the publish :meth:`poll` returned did not load: the polls until it is tried again,
        or None once :data:`RETRIES` retries failed (then only a new publish is tried)."""
        self._failures += 1
        if self._failures > self.retries:
            self._seen = self._trying
            return None
        self._skip = 2 ** (self._failures - 1) - 1
        return self._skip + 1


def watch_pending_root(model_root: Path | str) -> PointerWatcher:
    """A watcher for a model root with no model loaded from it yet, whose ``current.json`` may not exist yet.

    Its first poll that finds a pointer returns the pointer's target, however long
    after start the pointer appeared (even if the root itself did not exist at
    start): a challenger root is often published to only after the server is up.
    """
    return PointerWatcher(model_root, model_root)  # the root itself is never a pointer's target
