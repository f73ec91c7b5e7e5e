"""Payload logging: what the live model was asked and what it answered, as Parquet files.

One :class:`PayloadLogger` per worker process. The request path only calls
:meth:`PayloadLogger.record`, which appends one tuple to a bounded queue (a
``deque`` with a length check: O(1), no lock, never blocks, never raises; a full
queue drops the record and counts it in ``fluxo_payload_dropped_total``). A daemon
thread takes what is queued every ``poll`` and appends it to the open file.

Crash safety (serving/README.md, "Payload logging"): the file being written is
``<dir>/<date>/payload-<pid>-<start>-<seq>-<token>.parquet.partial``, an **Arrow IPC
stream** (append-only; each flush appends one record batch and flushes it to the
OS, so a SIGKILL loses at most the unflushed buffer). On rotation (size or age)
and at shutdown it is converted with ``pyarrow.parquet.ParquetWriter`` into
``….parquet.<pid>.tmp``, renamed to ``….parquet`` (atomic) and the journal removed. A
reader listing ``*.parquet`` therefore never sees a torn Parquet file, and
:func:`read_payloads` also reads every complete batch of a ``.partial`` a crash left.
With an ``s3://`` payload log the directory is a local spool and each sealed file is
then uploaded (serving/payload_store.py).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np

from serving.payload_store import PARTIAL, S3Upload, parquet_files

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
COLUMNS = ("request_id", "time", "route", "model_name", "model_version", "variant", "latency_ms",
           "inputs", "input_shape", "probabilities", "labels")


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("request_id", pa.string()), ("time", pa.timestamp("us", tz="UTC")), ("route", pa.string()),
        ("model_name", pa.string()), ("model_version", pa.string()), ("variant", pa.string()),
        ("latency_ms", pa.float32()), ("inputs", pa.list_(pa.float32())), ("input_shape", pa.list_(pa.int32())),
        ("probabilities", pa.list_(pa.float32())), ("labels", pa.list_(pa.string())),
    ])


class _Counters:
    """The three ``fluxo_payload_*`` counters of this process (serving/metrics.py)."""

    def __init__(self) -> None:
        from serving.metrics import get_metrics

        metrics = get_metrics()
        self.records, self.dropped, self.files = metrics.payload_records, metrics.payload_dropped, metrics.payload_files


class PayloadLogger:
    """Bounded queue on the request path, a writer thread behind it; see the module docstring."""

    def __init__(self, directory: Path | str, sample: float = 1.0, rotate_mb: float = 64.0, rotate_s: float = 300.0,
                 queue_size: int = 10_000, flush_records: int = 1000, flush_s: float = 1.0,
                 start: bool = True, upload: S3Upload | None = None) -> None:
        self.directory = Path(directory)
        # Made now, not with the first file: `fluxo monitor` tells a log with nothing in it yet from a
        # wrong path by the folder being there, and a folder the server cannot write fails at start.
        self.directory.mkdir(parents=True, exist_ok=True)
        self.upload = upload
        self.sample = sample
        self.rotate_bytes = int(rotate_mb * 1024 * 1024)
        self.rotate_s = rotate_s
        self.flush_records = flush_records
        self.flush_s = flush_s
        # A deque with a length check rather than queue.Queue: append/popleft are atomic under the GIL and
        # take no lock or condition (queue.Queue's put_nowait + get cost ~1-3 us per record, profiled).
        self.queue: deque[tuple[Any, ...]] = deque()
        self.queue_size = queue_size
        self.dropped = 0
        self.counters = _Counters()
        self._draw = random.random
        self._stop = threading.Event()
        self._started = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
        # In every file name: replicas in other containers or on other machines can share a pid and
        # a start second, and their files go to one bucket, where a same-named upload would replace
        # another replica's file (found with two replicas in the compose stack).
        self._token = uuid.uuid4().hex[:8]
        self._seq = 0
        self._file: _Journal | None = None
        self._thread = threading.Thread(target=self._run, name="fluxo-payload-log", daemon=True)
        if start:
            self._thread.start()

    # --- request path ----------------------------------------------------------------------

    def sampled(self) -> bool:
        """Per-request decision: True for a share ``sample`` of requests."""
        return self.sample >= 1.0 or self._draw() < self.sample

    def record(self, request_id: str, route: str, model_name: str, model_version: str | None, variant: str,
               latency_ms: float, inputs: np.ndarray, probabilities: np.ndarray, label_names: Sequence[str]) -> None:
        """Queue one answered request; O(1), never blocks, never raises (a full queue drops and counts).

        The arrays are kept by reference (nobody writes to them after the answer); flattening,
        the predicted labels and the Arrow conversion happen in the writer thread.
        """
        try:
            if len(self.queue) >= self.queue_size:
                self.dropped += 1
                self.counters.dropped.inc()
                return
            self.queue.append((request_id, time.time(), route, model_name, model_version, variant, latency_ms,
                               inputs, probabilities, label_names))
        except Exception:  # noqa: BLE001 - logging must never fail a request
            self.dropped += 1

    # --- writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        """Wake every ``poll`` seconds and take what is queued, rather than block in ``get``.

        A writer blocked in ``queue.get`` is woken by every ``put``: one GIL hand-over per
        request, taken from the event loop. Polling lets a ``put`` find no waiter (cheap)
        and moves records in bulk.
        """
        if self.upload is not None:  # what a crashed or disconnected worker left in the spool
            self._upload_safely(lambda: self.upload.recover(seal_journal))
        buffer: list[tuple[Any, ...]] = []
        last_flush = time.monotonic()
        poll = min(self.flush_s, 0.1)
        while True:
            stopping = self._stop.wait(poll)
            self._take(buffer)
            while len(buffer) >= self.flush_records:
                self._write_safely(buffer[: self.flush_records])
                del buffer[: self.flush_records]
                last_flush = time.monotonic()
            if buffer and (stopping or time.monotonic() - last_flush >= self.flush_s):
                self._write_safely(buffer)
                buffer, last_flush = [], time.monotonic()
            if stopping:
                break
            self._rotate_if_due()
        self._finish()

    def _take(self, buffer: list[tuple[Any, ...]]) -> None:
        """Move everything queued now into ``buffer`` without blocking."""
        pop = self.queue.popleft
        for _ in range(len(self.queue)):
            buffer.append(pop())

    def _write_safely(self, rows: list[tuple[Any, ...]]) -> None:
        try:
            batch = _batch(rows)  # before the file: a worker killed meanwhile leaves no empty journal behind
            journal = self._file or self._open()
            journal.append(batch)
            self.counters.records.inc(len(rows))
            self._rotate_if_due()
        except Exception:
            logger.exception("payload log: could not write %d records to %s", len(rows), self.directory)

    def _open(self) -> _Journal:
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        folder = self.directory / day
        folder.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        self._file = _Journal(folder / f"payload-{os.getpid()}-{self._started}-{self._seq:05d}-{self._token}{PARTIAL}")
        return self._file

    def _rotate_if_due(self) -> None:
        journal = self._file
        if journal is None:
            return
        if journal.size >= self.rotate_bytes or time.monotonic() - journal.opened >= self.rotate_s:
            self._seal()

    def _seal(self) -> None:
        journal, self._file = self._file, None
        if journal is None:
            return
        try:
            journal.seal()
            self.counters.files.inc()
        except Exception:
            logger.exception("payload log: could not convert %s to Parquet", journal.path)
        if self.upload is not None:
            self._upload_safely(self.upload.upload_pending)  # this file, and any an earlier failure kept

    def _upload_safely(self, send: Any) -> None:
        try:
            send()
        except Exception:
            logger.exception("payload log: uploading to %s failed; the files stay in %s", self.upload.url,
                             self.directory)

    def _finish(self) -> None:
        self._seal()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, seal the open file into ``.parquet`` and stop the thread (shutdown)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("payload log: writer still busy after %.0f s at shutdown", timeout)
        elif self._thread.ident is None:  # never started (tests): write in this thread
            self._run()


class _Journal:
    """One ``.parquet.partial``: an Arrow IPC stream, appended to and flushed batch by batch."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa

        self.path = path
        self.opened = time.monotonic()
        self._sink = open(path, "wb")  # noqa: SIM115 - closed in seal()
        self._writer = pa.ipc.new_stream(self._sink, _schema())

    @property
    def size(self) -> int:
        return self._sink.tell()

    def append(self, batch: Any) -> None:
        self._writer.write_batch(batch)
        self._sink.flush()  # into the OS: survives SIGKILL of the process

    def seal(self) -> Path:
        self._writer.close()
        self._sink.close()
        return seal_journal(self.path)


def seal_journal(path: Path) -> Path:
    """Convert a closed journal into ``<name>.parquet`` via ``.parquet.<pid>.tmp`` and an atomic rename; remove it.

    Also used on the journals a dead worker left: their complete batches are kept, a torn tail dropped.
    """
    import pyarrow.parquet as pq

    table = _read_stream(path)
    final = path.with_name(path.name[: -len(".partial")])
    tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")  # never another process's half-written file
    with pq.ParquetWriter(tmp, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, final)
    path.unlink()
    return final


def _batch(rows: list[tuple[Any, ...]]) -> Any:
    """Arrow columns for ``rows``: list columns from one concatenation each, labels by one argmax."""
    import pyarrow as pa

    (rid, when, route, name, version, variant, latency, inputs, probabilities, label_names) = zip(*rows)
    inputs = [np.asarray(x, dtype=np.float32) for x in inputs]
    probabilities = [np.asarray(p, dtype=np.float32).reshape(len(x), -1) for x, p in zip(inputs, probabilities)]
    counts = np.fromiter((len(p) for p in probabilities), dtype=np.int32, count=len(rows))
    merged = np.concatenate(probabilities) if probabilities else np.zeros((0, 0), np.float32)
    best = merged.argmax(axis=1) if merged.size else np.zeros(0, dtype=np.int64)
    if all(names is label_names[0] or list(names) == list(label_names[0]) for names in label_names):
        labels = np.asarray(label_names[0], dtype=object)[best]
    else:  # a hot reload changed the labels inside this batch
        per_row = np.repeat(np.arange(len(rows)), counts)
        labels = np.array([label_names[r][i] for r, i in zip(per_row, best)], dtype=object)
    schema = _schema()
    arrays = [
        pa.array(rid, pa.string()), pa.array((np.asarray(when) * 1e6).astype(np.int64), pa.int64()).cast(schema[1].type),
        pa.array(route, pa.string()), pa.array(name, pa.string()), pa.array(version, pa.string()),
        pa.array(variant, pa.string()), pa.array(latency, pa.float32()),
        _lists([x.ravel() for x in inputs], pa.float32()),
        _lists([np.asarray(x.shape, dtype=np.int32) for x in inputs], pa.int32()),
        _lists([p.ravel() for p in probabilities], pa.float32()),
        pa.ListArray.from_arrays(_offsets(counts), pa.array(labels, pa.string())),
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _offsets(lengths: np.ndarray) -> Any:
    import pyarrow as pa

    return pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))


def _lists(parts: list[np.ndarray], kind: Any) -> Any:
    """A list<kind> column from one array per row, with a single concatenation."""
    import pyarrow as pa

    lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    values = np.concatenate(parts) if parts else np.zeros(0)
    return pa.ListArray.from_arrays(_offsets(lengths), pa.array(values, kind))


_ID_PREFIX = f"{uuid.uuid4().hex[:12]}-"
_ids = itertools.count(1)


def new_request_id() -> str:
    """A process-unique id without ``uuid4`` per request (a random prefix per process, then a counter)."""
    return f"{_ID_PREFIX}{next(_ids):x}"


# --- reading -----------------------------------------------------------------------------


def _read_stream(path: Path) -> Any:
    """Every complete record batch of an IPC stream; a torn tail (crash mid-write) is ignored."""
    import pyarrow as pa

    batches = []
    try:
        with pa.OSFile(str(path), "rb") as source:
            reader = pa.ipc.open_stream(source)
            while True:
                try:
                    batches.append(reader.read_next_batch())
                except StopIteration:
                    break
    except (pa.ArrowInvalid, OSError, EOFError) as error:
        logger.debug("payload log: %s ends in a torn batch (%s); kept %d batches", path, error, len(batches))
    return pa.Table.from_batches(batches, schema=_schema())


def read_payloads(location: Path | str, since: date | None = None) -> Any:
    """All logged records of a payload log (a directory or an ``s3://`` URL) as a ``pyarrow.Table``.

    Reads every ``*.parquet`` (of the day folders from ``since`` on, when given) and, locally,
    recovers the complete batches of each ``*.parquet.partial`` a crashed worker left (skipped
    when its ``.parquet`` exists: a crash between rename and unlink).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    filesystem, sealed, journals = parquet_files(location, since)
    tables = [pq.read_table(path, filesystem=filesystem) for path in sealed]
    for path in map(Path, journals):
        if not path.with_name(path.name[: -len(".partial")]).exists():
            tables.append(_read_stream(path))
    if not tables:
        return _schema().empty_table()
    return pa.concat_tables([t.cast(_schema()) for t in tables])


__all__ = ["REQUEST_ID_HEADER", "PayloadLogger", "new_request_id", "read_payloads", "seal_journal"]
