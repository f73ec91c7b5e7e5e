"""Where sealed payload files end up (the local directory, or an S3 bucket) and how long they stay.

With ``FLUXO_PAYLOAD_LOG=s3://bucket/prefix`` each worker still journals to a local spool
directory (``FLUXO_PAYLOAD_SPOOL``), so the crash guarantees of serving/payload_log.py hold
unchanged: a SIGKILL loses at most the unflushed buffer. What changes is what happens
after a file is sealed into ``.parquet``: it is uploaded to
``s3://bucket/prefix/<date>/<name>.parquet`` in one PUT (an object appears whole or not
at all, so a reader never sees a torn file) and removed from the spool only once the
upload succeeded. A failed upload (the store is down, credentials expired) keeps the file
and is tried again after the next seal and at the next start, where files and journals a
dead worker left are sealed and sent too: the spool is the buffer between the service
and the store, and nothing is dropped because the store was unreachable for a while.

Uploads and retention run on a thread of their own (:class:`SpoolKeeper`), never on the
writer's: a store that takes a minute to answer, or a retention pass over a month of files,
must not hold up the writer and so fill the queue behind it. Retention (:class:`Retention`)
deletes the oldest finished files locally once they are past ``FLUXO_PAYLOAD_KEEP_DAYS`` or
the folder is over ``FLUXO_PAYLOAD_KEEP_MB``; the bucket expires objects by its own
lifecycle rule (deploy/minio-init.sh).

Credentials and endpoint come from the standard AWS variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``
for MinIO and other S3-compatible stores), the same ones boto3 and DVC read.
"""

from __future__ import annotations

import calendar
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from serving.errors import ServingError

logger = logging.getLogger(__name__)

S3 = "s3://"
PARQUET = ".parquet"
PARTIAL = ".parquet.partial"
TMP = ".tmp"


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def s3_filesystem(environ: Mapping[str, str] | None = None) -> Any:
    """A ``pyarrow.fs.S3FileSystem`` from the AWS variables, with an explicit endpoint for MinIO and the like."""
    from pyarrow.fs import S3FileSystem

    env = os.environ if environ is None else environ
    options: dict[str, Any] = {"connect_timeout": 5.0, "request_timeout": 30.0}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options |= {"endpoint_override": parsed.netloc + parsed.path.rstrip("/"), "scheme": parsed.scheme}
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    return S3FileSystem(**options)


def split_url(url: str) -> str:
    """``s3://bucket/prefix/`` → ``bucket/prefix`` (how pyarrow's file systems name paths)."""
    if not url.startswith(S3):
        raise ValueError(f"{url!r}: only s3:// URLs are supported for the payload log")
    path = url[len(S3):].strip("/")
    if not path:
        raise ValueError(f"{url!r}: name a bucket, e.g. s3://bucket/payloads")
    return path


def _writer_alive(path: Path) -> bool:
    """Is the worker that opened journal ``payload-<pid>-<start>-<seq>-<token>.parquet.partial`` still running?

    A killed worker can linger as a zombie (a container whose init does not reap) and its pid
    can be reused by a later process: neither is the writer, so neither keeps its journal from
    being sealed. Unknown names count as alive (left alone).
    """
    parts = path.name.split("-")
    if len(parts) < 4 or parts[0] != "payload" or not parts[1].isdigit():
        return True
    pid = int(parts[1])
    try:
        started = calendar.timegm(time.strptime(parts[2], "%Y%m%dT%H%M%S"))
    except ValueError:
        started = None
    try:
        import psutil
    except ImportError:  # pragma: no cover - bentoml depends on psutil
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or process.create_time() <= started + 2  # a later process under a reused pid
    except psutil.NoSuchProcess:
        return False


@dataclass
class S3Upload:
    """Sealed files from the spool to ``url``; each removed locally only once it is in the bucket."""

    url: str
    spool: Path
    filesystem: Any = None

    def __post_init__(self) -> None:
        self.prefix = split_url(self.url)
        self.spool = Path(self.spool)

    @property
    def fs(self) -> Any:
        if self.filesystem is None:
            self.filesystem = s3_filesystem()
        return self.filesystem

    def key(self, path: Path) -> str:
        return f"{self.prefix}/{path.parent.name}/{path.name}"  # <date>/<file>, as in a local log

    def upload(self, path: Path) -> bool:
        """Put one sealed file; True when it is in the bucket and gone from the spool."""
        try:
            with open(path, "rb") as source, self.fs.open_output_stream(self.key(path)) as sink:
                while chunk := source.read(1 << 20):
                    sink.write(chunk)
        except FileNotFoundError:
            return True  # another worker sent it first
        except Exception as error:  # noqa: BLE001 - the store's faults are many; the file stays for the next try
            logger.warning("payload log: could not upload %s to %s (%s); kept in the spool for the next try",
                           path.name, self.url, error)
            return False
        path.unlink(missing_ok=True)
        return True

    def pending(self) -> list[Path]:
        return sorted(self.spool.glob(f"*/*{PARQUET}"))

    def upload_pending(self) -> int:
        """Send every sealed file waiting in the spool; the number sent."""
        sent = 0
        for path in self.pending():
            if not self.upload(path):
                break  # the store is down: the rest waits too
            sent += 1
        return sent

    def recover(self, seal: Any) -> int:
        """At start: seal the journals dead workers left (``seal(path) -> Path``), then send everything sealed.

        The workers of one server start together on one spool: one at a time recovers (an
        flock on ``<spool>/.recover.lock``), the others then find nothing left to seal.
        """
        with _locked(self.spool / ".recover.lock"):
            for journal in sorted(self.spool.glob(f"*/*{PARTIAL}")):
                if _writer_alive(journal) or not journal.exists():
                    continue  # a live worker's open file (this one's own is not open yet)
                try:
                    seal(journal)
                except Exception as error:  # noqa: BLE001 - a journal that cannot be read is left as it is
                    logger.warning("payload log: could not seal %s left by a dead worker (%s)", journal, error)
            return self.upload_pending()


@contextmanager
def _locked(path: Path, wait: bool = True) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` for the block; yields False when ``wait`` is off and another holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


@dataclass(frozen=True)
class PayloadPart:
    """One file of a payload log, as a reader streaming newest first needs it."""

    path: str
    newest: float
    """Epoch seconds no record in the file is newer than: its modification time, since a file is
    written (sealed, uploaded, flushed) after the records in it were taken."""
    journal: bool
    """An Arrow IPC stream (``.parquet.partial``) rather than Parquet."""


def payload_parts(location: str | Path, since: date | None = None) -> tuple[Any, list[PayloadPart]]:
    """(file system or None, every file of a payload log) newest first, from the day folders from ``since`` on.

    Journals whose ``.parquet`` exists (a crash between rename and removal) are left out: the
    same records twice. A reader that stops once it has what it wants reads the newest files only.
    """
    filesystem, parts = _listing(location, since)
    sealed = {part.path for part in parts if not part.journal}
    kept = [part for part in parts if not (part.journal and part.path[: -len(".partial")] in sealed)]
    return filesystem, sorted(kept, key=lambda part: part.newest, reverse=True)


def parquet_files(location: str | Path, since: date | None = None) -> tuple[Any, list[str], list[str]]:
    """(file system or None, sealed files, journals) of a payload log, oldest day first.

    ``since`` skips the day folders before it: a window over the last hours reads one or two
    days, not the whole history of the bucket.
    """
    filesystem, parts = _listing(location, since)
    return (filesystem, sorted(p.path for p in parts if not p.journal), sorted(p.path for p in parts if p.journal))


def _listing(location: str | Path, since: date | None) -> tuple[Any, list[PayloadPart]]:
    """Every ``.parquet`` (and, locally, ``.parquet.partial``) in the day folders from ``since`` on, unordered."""
    if is_url(location):
        from pyarrow.fs import FileSelector, FileType

        fs = s3_filesystem()
        root = split_url(str(location))
        try:
            days = [info for info in fs.get_file_info(FileSelector(root, allow_not_found=True))
                    if info.type == FileType.Directory and _day(info.base_name, since)]
        except OSError as error:
            raise OSError(f"{location}: cannot list the payload log ({error}); check the AWS_* variables "
                          "and that the bucket exists") from error
        infos = [info for day in days for info in fs.get_file_info(FileSelector(day.path))
                 if info.path.endswith(PARQUET)]
        return fs, [PayloadPart(info.path, info.mtime.timestamp() if info.mtime else float("inf"), False)
                    for info in infos]
    parts = []
    for day in Path(location).glob("*"):
        if not (day.is_dir() and _day(day.name, since)):
            continue
        for path in day.iterdir():
            if path.name.endswith((PARQUET, PARTIAL)):
                try:
                    newest = path.stat().st_mtime
                except FileNotFoundError:  # sealed or removed by retention while listed
                    continue
                parts.append(PayloadPart(str(path), newest, path.name.endswith(PARTIAL)))
    return None, parts


def _day(name: str, since: date | None) -> bool:
    """A ``YYYY-MM-DD`` folder on or after ``since`` (every day folder when ``since`` is None)."""
    try:
        day = datetime.strptime(name, "%Y-%m-%d").date()
    except ValueError:
        return False
    return since is None or day >= since


@dataclass(frozen=True)
class Retention:
    """How much of a payload log stays on local disk: ServingConfig's ``payload_keep_days`` and ``payload_keep_mb``."""

    keep_days: float
    """Finished files older than this many days are deleted; 0 keeps them forever."""
    keep_mb: float
    """While the folder holds more than this many MiB the oldest finished files are deleted; 0: no cap."""

    def enforce(self, directory: Path, now: float | None = None) -> list[Path]:
        """Delete what is past the age or over the size, oldest first; the paths deleted.

        Only finished files go: sealed ``.parquet`` and what dead workers left (journals, ``.tmp``).
        A live worker's open journal counts toward the size but is never touched. The workers of
        one server share the folder: one at a time enforces (the others skip this round).
        """
        if not directory.is_dir() or (self.keep_days <= 0 and self.keep_mb <= 0):
            return []
        with _locked(directory / ".retention.lock", wait=False) as held:
            if not held:
                return []
            files = _finished_files(directory)
            total = sum(size for _, size, _, _ in files)
            cutoff = (now or time.time()) - self.keep_days * 86400 if self.keep_days > 0 else float("-inf")
            cap = self.keep_mb * 1024 * 1024 if self.keep_mb > 0 else float("inf")
            removed = []
            for mtime, size, path, finished in sorted(files):
                if finished and (mtime < cutoff or total > cap):
                    path.unlink(missing_ok=True)
                    removed.append(path)
                    total -= size
            _remove_empty_days(directory)
        return removed


def _finished_files(directory: Path) -> list[tuple[float, int, Path, bool]]:
    """(mtime, size, path, may be deleted) of every file in the day folders."""
    files = []
    for path in directory.glob("*/payload-*"):
        if not _day(path.parent.name, None):
            continue
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        if path.name.endswith(PARQUET):
            finished = True
        elif path.name.endswith(PARTIAL):
            finished = not _writer_alive(path)
        elif path.name.endswith(TMP):  # ``<final>.<sealer pid>.tmp``: a seal killed midway
            sealer = path.name.split(".")[-2]
            finished = sealer.isdigit() and not _pid_alive(int(sealer))
        else:
            continue
        files.append((info.st_mtime, info.st_size, path, finished))
    return files


def _remove_empty_days(directory: Path) -> None:
    """Day folders emptied by retention, except today's and yesterday's (a writer may be about to open a file there)."""
    today = datetime.now(UTC).date()
    for day in directory.glob("*"):
        if _day(day.name, None) and (today - datetime.strptime(day.name, "%Y-%m-%d").date()).days > 1:
            try:
                day.rmdir()
            except OSError:
                pass  # not empty


def _pid_alive(pid: int) -> bool:
    try:
        import psutil
    except ImportError:  # pragma: no cover - bentoml depends on psutil
        return True
    return psutil.pid_exists(pid)


def private_dir(path: Path) -> Path:
    """Make ``path`` (parents too) and keep it to this user: owned by us, mode 0700.

    The spool holds what clients sent before it reaches the bucket: a folder others can read
    leaks it, and one another user made first could have files swapped in that are then
    uploaded as ours. So a folder that is not ours is refused, and one others can enter is closed.
    """
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise ServingError(f"{path}: the payload spool belongs to another user (uid {info.st_uid}); "
                           "set FLUXO_PAYLOAD_SPOOL to a folder of your own")
    if info.st_mode & 0o077:
        path.chmod(0o700)
    return path


class SpoolKeeper:
    """The payload log's second thread: sends sealed files to the store and applies retention.

    The writer only seals and calls :meth:`wake`; this thread also wakes every ``interval_s``
    (a store that was down is tried again, old files expire on a quiet server). At start it
    seals and sends what dead workers left (:meth:`S3Upload.recover`).
    """

    def __init__(self, directory: Path, upload: S3Upload | None, retention: Retention,
                 seal: Callable[[Path], Path], expired: Any, interval_s: float = 60.0) -> None:
        self.directory = directory
        self.upload = upload
        self.retention = retention
        self.seal = seal
        self.expired = expired  # fluxo_payload_expired_files_total
        self.interval_s = interval_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._recovered = False
        self._thread = threading.Thread(target=self._run, name="fluxo-payload-keeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """A file was sealed: send it (and apply retention) now rather than at the next interval."""
        self._wake.set()

    def stop(self, timeout: float) -> None:
        """One last pass (what the writer sealed at shutdown is sent), then end; inline when never started."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("payload log: still uploading after %.0f s at shutdown; the rest waits in %s",
                               timeout, self.directory)
        elif self._thread.ident is None:
            self._run()

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()  # read before the pass: a stop during it still gets a pass after it
            self.run_once()
            if stopping:
                return
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def run_once(self) -> None:
        """Recover (the first time), upload what waits, then apply retention; never raises."""
        try:
            if self.upload is not None:
                if not self._recovered:
                    self._recovered = True
                    self.upload.recover(self.seal)
                else:
                    self.upload.upload_pending()
        except Exception:
            logger.exception("payload log: uploading to %s failed; the files stay in %s", self.upload.url,
                             self.directory)
        try:
            removed = self.retention.enforce(self.directory)
        except Exception:
            logger.exception("payload log: retention in %s failed", self.directory)
            return
        if removed:
            self.expired.inc(len(removed))
            waiting = " (not yet uploaded)" if self.upload is not None else ""
            logger.warning("payload log: retention deleted %d files%s from %s, oldest %s", len(removed), waiting,
                           self.directory, removed[0].name)


__all__ = ["PayloadPart", "Retention", "S3Upload", "SpoolKeeper", "is_url", "parquet_files", "payload_parts",
           "private_dir", "s3_filesystem", "split_url"]
