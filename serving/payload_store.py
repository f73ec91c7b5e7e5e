"""Where sealed payload files end up: the local directory they were written in, or an S3 bucket.

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

Credentials and endpoint come from the standard AWS variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``
for MinIO and other S3-compatible stores), the same ones boto3 and DVC read.
"""

from __future__ import annotations

import calendar
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

S3 = "s3://"
PARQUET = ".parquet"
PARTIAL = ".parquet.partial"


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
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` for the block (none where there is no fcntl)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def parquet_files(location: str | Path, since: date | None = None) -> tuple[Any, list[str], list[str]]:
    """(file system or None, sealed files, journals) of a payload log, oldest day first.

    ``since`` skips the day folders before it: a window over the last hours reads one or two
    days, not the whole history of the bucket.
    """
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
        files = [info.path for day in sorted(days, key=lambda d: d.base_name)
                 for info in fs.get_file_info(FileSelector(day.path)) if info.path.endswith(PARQUET)]
        return fs, sorted(files), []
    root_dir = Path(location)
    days = sorted(p for p in root_dir.glob("*") if p.is_dir() and _day(p.name, since))
    sealed = [str(p) for day in days for p in sorted(day.glob(f"*{PARQUET}"))]
    journals = [str(p) for day in days for p in sorted(day.glob(f"*{PARTIAL}"))]
    return None, sealed, journals


def _day(name: str, since: date | None) -> bool:
    """A ``YYYY-MM-DD`` folder on or after ``since`` (every day folder when ``since`` is None)."""
    try:
        day = datetime.strptime(name, "%Y-%m-%d").date()
    except ValueError:
        return False
    return since is None or day >= since


__all__ = ["S3Upload", "is_url", "parquet_files", "s3_filesystem", "split_url"]
