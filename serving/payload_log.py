"""Payload logging: what the live model was asked and what it answered, as Parquet files.

One :class:`PayloadLogger` per worker process. The request path only calls
:meth:`PayloadLogger.record`, which appends one tuple to a queue bounded by records
and by bytes (a ``deque`` with a size check: O(1), never blocks, never raises; a full
queue drops the record and counts it in ``fluxo_payload_dropped_total``). A daemon
thread takes what is queued every ``poll`` and appends it to the open file; a second
one (serving/payload_store.py ``SpoolKeeper``) uploads sealed files and applies retention,
so neither a slow store nor a large folder holds the writer up.

Crash safety (serving/README.md, "Payload logging"): the file being written is
``<dir>/<date>/payload-<pid>-<start>-<seq>-<token>.parquet.partial``, an **Arrow IPC
stream** (append-only; each flush appends one record batch and flushes it to the
OS, so a SIGKILL loses at most the unflushed buffer). On rotation (size or age)
and at shutdown it is converted with ``pyarrow.parquet.ParquetWriter`` into
``….parquet.<pid>.tmp``, renamed to ``….parquet`` (atomic) and the journal removed (a
failed conversion removes its ``.tmp`` and keeps the journal). A reader listing
``*.parquet`` therefore never sees a torn Parquet file, and :func:`read_payloads` also
reads every complete batch of a ``.partial`` a crash left. A write that fails midway
(disk full) leaves a torn batch at the journal's end: nothing more is appended to it; it
is sealed up to its last whole batch and the next records start a new journal.
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
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np

from serving.payload_store import PARTIAL, PayloadPart, Retention, S3Upload, SpoolKeeper, parquet_files, private_dir

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
# What a queued record costs beside its arrays (tuple, ids, strings): a flood of tiny records is bounded too.
_RECORD_OVERHEAD = 256
# Rows of a sealed file are grouped up to this size: a reader streaming a file row group by row group
# (pipelines/monitor/window.py) and the seal itself hold one group, not the file; larger groups keep footers small.
_ROW_GROUP_BYTES = 4 * 1024 * 1024
COLUMNS = ("request_id", "time", "route", "model_name", "model_version", "variant", "latency_ms",
           "inputs", "input_shape", "probabilities", "labels")
"""One record per answered request. ``probabilities``: per instance, what the model answered, flat (a
classifier's probabilities over its labels; a regression model's one value, in the target's units, so
each instance's list holds one number and a reader's ``reshape(n, -1)`` gives (n, 1) values). ``labels``:
per instance, the most probable label (a regression model: its one label, the target's name)."""


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("request_id", pa.string()), ("time", pa.timestamp("us", tz="UTC")), ("route", pa.string()),
        ("model_name", pa.string()), ("model_version", pa.string()), ("variant", pa.string()),
        ("latency_ms", pa.float32()), ("inputs", pa.list_(pa.float32())), ("input_shape", pa.list_(pa.int32())),
        ("probabilities", pa.list_(pa.float32())), ("labels", pa.list_(pa.string())),
    ])


class _Counters:
    """The ``fluxo_payload_*`` counters of this process (serving/metrics.py)."""

    def __init__(self) -> None:
        from serving.metrics import get_metrics

        metrics = get_metrics()
        self.records, self.dropped, self.files = metrics.payload_records, metrics.payload_dropped, metrics.payload_files
        self.expired = metrics.payload_expired


class PayloadLogger:
    """Bounded queue on the request path, a writer thread behind it; see the module docstring."""

    def __init__(self, directory: Path | str, sample: float = 1.0, rotate_mb: float = 64.0, rotate_s: float = 300.0,
                 queue_size: int = 10_000, flush_records: int = 1000, flush_s: float = 1.0,
                 start: bool = True, upload: S3Upload | None = None, queue_mb: float = 64.0,
                 retention: Retention = Retention(keep_days=0, keep_mb=0)) -> None:
        self.directory = Path(directory)
        # Made now, not with the first file: `fluxo monitor` tells a log with nothing in it yet from a
        # wrong path by the folder being there, and a folder the server cannot write fails at start.
        if upload is not None:
            private_dir(self.directory)
        else:
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
        self.queue_bytes = int(queue_mb * 1024 * 1024)
        # Bytes queued = added - taken, two counters with one writer each: `record` runs on the worker's
        # event loop only (every prediction route is async), `_take` on the writer thread. No lock and no
        # lost update; a stale read of the other counter only makes the check stricter. (A lock doubled
        # what `record` costs, measured.)
        self._added = 0
        self._taken = 0
        self.dropped = 0
        self.counters = _Counters()
        self._unsealed: list[Path] = []  # journals whose conversion failed: tried again at the next seal
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
        self.keeper = SpoolKeeper(self.directory, upload, retention, seal_journal, self.counters.expired)
        if start:
            self._thread.start()
            self.keeper.start()

    @classmethod
    def from_config(cls, config: Any) -> PayloadLogger:
        """The logger a :class:`serving.ServingConfig` with ``payload_log`` set describes."""
        upload = S3Upload(config.payload_upload, config.payload_log) if config.payload_upload is not None else None
        return cls(config.payload_log, config.payload_sample, config.payload_rotate_mb, config.payload_rotate_s,
                   config.payload_queue, flush_s=config.payload_flush_s, upload=upload, queue_mb=config.payload_queue_mb,
                   retention=Retention(config.payload_keep_days, config.payload_keep_mb))

    # --- request path ----------------------------------------------------------------------

    def sampled(self) -> bool:
        """Per-request decision: True for a share ``sample`` of requests."""
        return self.sample >= 1.0 or self._draw() < self.sample

    def record(self, request_id: str, route: str, model_name: str, model_version: str | None, variant: str,
               latency_ms: float, inputs: np.ndarray, probabilities: np.ndarray, label_names: Sequence[str]) -> None:
        """Queue one answered request; O(1), never blocks, never raises (a full queue drops and counts).

        ``probabilities``: the rows the model answered, (n, n_labels), or a regression model's (n, 1) values.

        The arrays are kept by reference (nobody writes to them after the answer); flattening,
        the predicted labels and the Arrow conversion happen in the writer thread. Full means
        ``queue_size`` records or ``queue_bytes`` of arrays, whichever comes first: records of
        up to a request body each would otherwise let the queue hold gigabytes.
        """
        try:
            size = inputs.nbytes + probabilities.nbytes + _RECORD_OVERHEAD
            if len(self.queue) >= self.queue_size or self._added - self._taken + size > self.queue_bytes:
                self._drop(1)
                return
            self._added += size
            self.queue.append((request_id, time.time(), route, model_name, model_version, variant, latency_ms,
                               inputs, probabilities, label_names, size))
        except Exception:  # noqa: BLE001 - logging must never fail a request
            self.dropped += 1

    # --- writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        """Wake every ``poll`` seconds and take what is queued, rather than block in ``get``.

        A writer blocked in ``queue.get`` is woken by every ``put``: one GIL hand-over per
        request, taken from the event loop. Polling lets a ``put`` find no waiter (cheap)
        and moves records in bulk.
        """
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
        taken = 0
        for _ in range(len(self.queue)):
            row = pop()
            taken += row[-1]
            buffer.append(row)
        self._taken += taken

    @property
    def queued_bytes(self) -> int:
        """What the records waiting for the writer weigh, as the cap counts it."""
        return self._added - self._taken

    def _drop(self, records: int) -> None:
        self.dropped += records
        self.counters.dropped.inc(records)

    def _write_safely(self, rows: list[tuple[Any, ...]]) -> None:
        try:
            batch = _batch(rows)  # before the file: a worker killed meanwhile leaves no empty journal behind
            journal = self._file or self._open()
        except Exception:
            logger.exception("payload log: could not write %d records to %s", len(rows), self.directory)
            self._drop(len(rows))
            return
        try:
            journal.append(batch)
        except Exception:
            logger.exception("payload log: writing %d records to %s failed; sealing it up to its last whole batch "
                             "and starting a new file", len(rows), journal.path)
            self._drop(len(rows))
            self._file = None  # never append after a torn batch: a reader stops there and loses the rest
            journal.abandon()
            self._seal_journal(journal.path)
            return
        self.counters.records.inc(len(rows))
        self._rotate_if_due()

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
        if journal is not None:
            try:
                journal.close()
            except Exception:  # the stream's end marker did not fit (disk full): its batches are whole all the same
                logger.exception("payload log: could not close %s", journal.path)
                journal.abandon()
            self._seal_journal(journal.path)
        for path in self._unsealed[:]:  # an earlier failure (disk full) may have passed
            self._unsealed.remove(path)
            self._seal_journal(path)
        self.keeper.wake()  # sends it (and any an earlier failure kept) on the keeper's thread

    def _seal_journal(self, path: Path) -> None:
        """Convert one closed journal; on failure it stays a readable journal and is tried again later."""
        try:
            seal_journal(path)
            self.counters.files.inc()
        except Exception:
            logger.exception("payload log: could not convert %s to Parquet; kept as it is", path)
            if path.exists():
                self._unsealed.append(path)

    def _finish(self) -> None:
        self._seal()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, seal the open file, send what waits and stop both threads (shutdown)."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("payload log: writer still busy after %.0f s at shutdown", timeout)
        elif self._thread.ident is None:  # never started (tests): write in this thread
            self._run()
        self.keeper.stop(max(deadline - time.monotonic(), 1.0))


class _Journal:
    """One ``.parquet.partial``: an Arrow IPC stream, appended to and flushed batch by batch."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa

        self.path = path
        self.opened = time.monotonic()
        self._sink = open(path, "wb")  # noqa: SIM115 - closed in close() or abandon()
        try:
            self._writer = pa.ipc.new_stream(self._sink, _schema())
            self._sink.flush()
        except BaseException:
            self.abandon()
            path.unlink(missing_ok=True)  # not even the schema is whole: nothing to keep
            raise

    @property
    def size(self) -> int:
        return self._sink.tell()

    def append(self, batch: Any) -> None:
        self._writer.write_batch(batch)
        self._sink.flush()  # into the OS: survives SIGKILL of the process

    def close(self) -> None:
        self._writer.close()
        self._sink.close()

    def abandon(self) -> None:
        """Close after a failed write without writing more: what did not reach the file is dropped."""
        for close in (getattr(self, "_writer", None), self._sink):
            try:
                if close is not None:
                    close.close()
            except Exception:  # noqa: BLE001 - the buffered tail fails again (the disk is still full)
                pass


def seal_journal(path: Path) -> Path:
    """Convert a closed journal into ``<name>.parquet`` via ``.parquet.<pid>.tmp`` and an atomic rename; remove it.

    Also used on the journals a dead worker left, or one a failed write tore: their complete
    batches are kept, a torn tail dropped. Streamed in row groups of ~``_ROW_GROUP_BYTES``, so
    sealing holds one group, not the file. A failure (disk full) removes the ``.tmp`` and raises;
    the journal is left as it was.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    final = path.with_name(path.name[: -len(".partial")])
    tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")  # never another process's half-written file
    try:
        with pq.ParquetWriter(tmp, _schema()) as writer:
            group: list[Any] = []
            for batch in _stream_batches(path):
                group.append(batch)
                if sum(b.nbytes for b in group) >= _ROW_GROUP_BYTES:
                    writer.write_table(pa.Table.from_batches(group))
                    group = []
            if group:  # none at all: a file with the schema and no rows
                writer.write_table(pa.Table.from_batches(group, schema=_schema()))
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    path.unlink()
    return final


def _batch(rows: list[tuple[Any, ...]]) -> Any:
    """Arrow columns for ``rows``: list columns from one concatenation each, labels by one argmax."""
    import pyarrow as pa

    (rid, when, route, name, version, variant, latency, inputs, probabilities, label_names, _) = zip(*rows)
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


def _stream_batches(path: Path | str) -> Iterator[Any]:
    """Every complete record batch of an IPC stream, one at a time; a torn tail (crash or failed write) ends it."""
    import pyarrow as pa

    kept = 0
    try:
        with pa.OSFile(str(path), "rb") as source:
            reader = pa.ipc.open_stream(source)
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                kept += 1
                yield batch
    except (pa.ArrowInvalid, OSError, EOFError) as error:
        logger.debug("payload log: %s ends in a torn batch (%s); kept %d batches", path, error, kept)


def _read_stream(path: Path) -> Any:
    """Every complete record batch of an IPC stream as one table."""
    import pyarrow as pa

    return pa.Table.from_batches(list(_stream_batches(path)), schema=_schema())


def part_batches(filesystem: Any, part: PayloadPart, columns: Sequence[str]) -> Iterator[Any]:
    """The records of one file of a payload log (serving/payload_store.py ``payload_parts``), ``columns`` only,
    a record batch at a time: a reader holds one row group, never the file."""
    import pyarrow.parquet as pq

    if part.journal:
        for batch in _stream_batches(part.path):
            yield batch.select(list(columns))
        return
    try:
        source = filesystem.open_input_file(part.path) if filesystem is not None else part.path
        # Column chunks streamed through a small buffer rather than read whole ahead of decoding.
        parquet = pq.ParquetFile(source, pre_buffer=False, buffer_size=1 << 20)
    except FileNotFoundError:  # deleted by retention since it was listed
        return
    with parquet:
        if parquet.metadata.num_row_groups == 0:
            return
        group = parquet.metadata.row_group(0)
        # Batches of ~1 MiB whatever a record weighs: decoding holds a batch, so rows count for nothing.
        rows = max(1, int(group.num_rows * (1 << 20) / max(group.total_byte_size, 1)))
        yield from parquet.iter_batches(batch_size=rows, columns=list(columns))


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


__all__ = ["REQUEST_ID_HEADER", "PayloadLogger", "new_request_id", "part_batches", "read_payloads", "seal_journal"]
