"""A model directory's checksums: sha256 of each file, recorded once, so a torn or altered copy is told apart.

``checksums.json`` beside ``model.onnx`` maps each file's name to its sha256. Export writes
it last into its staging folder (:func:`seal`); the model cache (serving/contract.py's
``materialize``) copies files while hashing them, checks them against the record when the
source has one, and writes its own record for what it holds. A copy torn by a crash (a
truncated ``model.onnx``, a half-written ``registry.json``) then fails :func:`damage` and
is fetched again, instead of failing every restart until someone deletes it. Directories
exported before checksums existed have no record: callers compute one once.

Every file written here is fsynced before the rename that publishes it, and the folder
after, so a crash leaves the old state or the new one on disk, not a name pointing at
zeros. Standard library only: export and the service both use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from serving import ServingError

CHECKSUMS_FILE = "checksums.json"
_CHUNK = 1 << 20


def fsync_dir(path: Path | str) -> None:
    """Make a folder's entries (a rename into it, a new file) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames are durable on their own terms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def digest(path: Path | str, *, sync: bool = False) -> str:
    """sha256 of a file, streamed; ``sync`` also fsyncs it (a file just written, before it is published)."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha.update(chunk)
        if sync:
            os.fsync(handle.fileno())
    return sha.hexdigest()


def copy_synced(source: Path | str, target: Path | str) -> str:
    """Copy a file, hashing the bytes as they are written and fsyncing the copy; returns their sha256."""
    sha = hashlib.sha256()
    with open(source, "rb") as src, open(target, "wb") as dst:
        while chunk := src.read(_CHUNK):
            sha.update(chunk)
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return sha.hexdigest()


def write_synced(path: Path | str, text: str) -> None:
    """Write a small text file through a temporary file, fsynced, renamed into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checksums(model_dir: Path | str) -> dict[str, str] | None:
    """The recorded ``{file name: sha256}``; None when the directory has no record (exported before them).

    An unreadable record is a ServingError: it is itself a sign of a torn copy.
    """
    path = Path(model_dir) / CHECKSUMS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise TypeError("files must map names to sha256 strings")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise ServingError(f"{path}: unreadable ({error}); the directory is damaged") from error
    return {str(name): value for name, value in files.items()}


def write_checksums(model_dir: Path | str, digests: Mapping[str, str]) -> None:
    """Record ``digests`` as the directory's ``checksums.json`` (fsynced, then the folder)."""
    body = {"algorithm": "sha256", "files": dict(sorted(digests.items()))}
    write_synced(Path(model_dir) / CHECKSUMS_FILE, json.dumps(body, indent=2) + "\n")
    fsync_dir(model_dir)


def seal(model_dir: Path | str, names: Iterable[str] | None = None) -> dict[str, str]:
    """Hash (and fsync) ``names`` (default: every file in the folder) and record them; returns the record."""
    model_dir = Path(model_dir)
    if names is None:
        names = sorted(p.name for p in model_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    digests = {name: digest(model_dir / name, sync=True) for name in names if name != CHECKSUMS_FILE}
    write_checksums(model_dir, digests)
    return digests


def damage(model_dir: Path | str, recorded: Mapping[str, str]) -> str | None:
    """What differs between the files and their record (a missing file, other bytes), or None when whole."""
    model_dir = Path(model_dir)
    for name, expected in sorted(recorded.items()):
        path = model_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if digest(path) != expected:
            return f"{name} does not match its recorded sha256"
    return None
