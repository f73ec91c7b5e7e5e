"""The window ``fluxo monitor`` tests: the newest logged instances one model version answered."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import FluxoError


@dataclass
class Window:
    """Logged instances (one row each, batch requests unrolled) and what the window covered."""

    inputs: np.ndarray  # (n, *input_shape) float32, as clients sent them
    probabilities: np.ndarray  # (n, classes) as the service answered
    requests: int
    start: datetime
    end: datetime
    first_seen: datetime | None
    last_seen: datetime | None
    values: np.ndarray | None = None  # (n,): a regression model's answers, as the service answered; else None

    def __len__(self) -> int:
        return len(self.inputs)

    def as_dict(self) -> dict[str, object]:
        def text(moment: datetime | None) -> str | None:
            return None if moment is None else moment.isoformat(timespec="seconds")

        return {"start": text(self.start), "end": text(self.end), "instances": len(self), "requests": self.requests,
                "first_logged": text(self.first_seen), "last_logged": text(self.last_seen)}


# What the window needs of a record; the request ids, routes, latencies and labels are never read.
_COLUMNS = ("time", "model_name", "model_version", "variant", "inputs", "input_shape", "probabilities")


def read_window(location: Path | str, model_name: str, model_version: str | None, input_shape: tuple[int, ...],
                hours: float, max_instances: int, now: datetime | None = None, regression: bool = False,
                reader: Callable[[Path | str, list[Any], "Wanted"], Any] | None = None) -> Window:
    """The newest ``max_instances`` instances of ``model_name`` v``model_version`` logged in the last ``hours``.

    ``location`` is the payload log: a local directory or the ``s3://`` URL the service uploads to.

    Only the champion variant's answers count: a challenger's (canary) answers come from
    another model, so their probabilities are not this model's.

    ``regression``: the model answers one value per instance, which its records hold as ``probabilities``
    (serving/payload_log.py): the window's ``values``.

    Files are read newest first, a record batch at a time, keeping only the newest instances
    that fit the window; reading stops once no file left can hold a newer one. Memory is the
    window plus one row group, however large the day (bench/monitor_memory.py).

    ``reader``: reads the window's files instead of this process (``newest_records``'s answer from the
    location, the files newest first and what is wanted): pipelines/monitor/on_cluster.py's tasks.
    """
    from serving.payload_store import payload_parts

    if "://" not in str(location) and not Path(location).is_dir():
        raise FluxoError(f"{location}: no payload log there; serve with --set serve.payload_log={location} "
                         "(or point monitor.payload_log at the directory the service writes)")
    end = now or datetime.now(UTC)
    start = end - timedelta(hours=hours)
    wanted = Wanted(model_name, model_version, tuple(input_shape), start, max_instances)
    try:
        filesystem, parts = payload_parts(location, since=start.date())  # day folders before the window: not listed
        in_window = [part for part in parts if part.newest >= start.timestamp()]  # newest first: a prefix
        if reader is not None:
            table = reader(location, in_window, wanted)
        else:
            table = newest_records(filesystem, in_window, wanted)
    except OSError as error:
        raise FluxoError(str(error)) from error
    return _window(table, max_instances, input_shape, start, end, regression)


@dataclass(frozen=True)
class Wanted:
    """Which records a window counts, and how many instances it holds."""

    model_name: str
    model_version: str | None
    input_shape: tuple[int, ...]
    start: datetime
    max_instances: int


def newest_records(filesystem: Any, parts: list[Any], wanted: Wanted) -> Any:
    """The newest records of ``parts`` (newest file first) holding ``wanted.max_instances`` instances, as one
    table newest first (None when none match); stops at the first file that cannot hold a newer one."""
    from serving.payload_log import part_batches

    newest = Newest(wanted.max_instances)
    for part in parts:
        if newest.full_before(part.newest):
            break
        for batch in part_batches(filesystem, part, _COLUMNS):
            newest.add(_matching(batch, wanted.model_name, wanted.model_version, wanted.input_shape, wanted.start))
    return newest.table


class Newest:
    """The newest records holding ``limit`` instances, of all those added so far (on equal times, the first added)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.table = None

    def full_before(self, moment: float) -> bool:
        """Does the window hold ``limit`` instances all logged at or after ``moment`` (epoch seconds)?"""
        if self.table is None or _instances(self.table).sum() < self.limit:
            return False
        return self.table["time"][-1].as_py().timestamp() >= moment

    def add(self, table: Any) -> None:
        import pyarrow as pa

        if not len(table):
            return
        merged = table if self.table is None else pa.concat_tables([self.table, table])
        times = merged["time"].cast(pa.int64()).to_numpy()
        order = np.argsort(-times, kind="stable")  # newest first
        counts = _instances(merged)[order]
        needed = int(np.searchsorted(np.cumsum(counts), self.limit)) + 1  # rows up to the one reaching the limit
        # Only the kept rows are taken (copied, newest first): the batch read is let go, not sorted whole.
        self.table = merged.take(order[:needed])


def _instances(table: Any) -> np.ndarray:
    """Instances per record: the first entry of each ``input_shape``."""
    import pyarrow.compute as pc

    return pc.list_element(table["input_shape"], 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _matching(batch: Any, model_name: str, model_version: str | None, input_shape: tuple[int, ...],
              start: datetime) -> Any:
    """The records of ``batch`` the window counts, as a table: this model (and version), its champion's
    answers, logged since ``start``, in this input contract (an old version's log can differ)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keep = pc.and_(pc.equal(batch["model_name"], model_name), pc.greater_equal(batch["time"], start))
    keep = pc.and_(keep, pc.not_equal(batch["variant"], "challenger"))
    if model_version is not None:
        keep = pc.and_(keep, pc.equal(batch["model_version"], str(model_version)))
    table = pa.Table.from_batches([batch]).filter(keep)
    shapes = table["input_shape"].to_pylist()
    same = pa.array([tuple(shape[1:]) == tuple(input_shape) for shape in shapes], pa.bool_())
    return table.filter(same) if len(shapes) else table


def _window(table: Any, max_instances: int, input_shape: tuple[int, ...], start: datetime, end: datetime,
            regression: bool = False) -> Window:
    """The :class:`Window` of ``table``'s records (newest first); the last one is cut to ``max_instances`` in all.

    A regression model's values: each record's ``probabilities``, (n, 1); when a record holds other than
    one value per instance, the window has none and the monitor runs the graph on its inputs instead.
    """
    inputs, probabilities, values, times, kept = [], [], [], [], 0
    rows = [] if table is None else zip(table["inputs"].to_numpy(zero_copy_only=False),
                                        table["probabilities"].to_numpy(zero_copy_only=False), table["time"].to_pylist())
    for row_inputs, row_probabilities, when in rows:
        x = np.asarray(row_inputs, np.float32).reshape(-1, *input_shape)
        p = (np.zeros((len(x), 0), np.float32) if row_probabilities is None
             else np.asarray(row_probabilities, np.float32).reshape(len(x), -1))
        take = min(len(x), max_instances - kept)
        inputs.append(x[:take])
        probabilities.append(p[:take])
        if regression and values is not None:
            if p.shape[1] == 1:
                values.append(p[:take, 0])
            else:
                values = None
        times.append(when)
        kept += take
    if not inputs:
        empty = np.zeros((0, *input_shape), np.float32)
        return Window(empty, np.zeros((0, 0), np.float32), 0, start, end, None, None,
                      np.zeros(0, np.float32) if regression else None)
    return Window(np.concatenate(inputs), _rows(probabilities), len(times), start, end, min(times), max(times),
                  np.concatenate(values) if regression and values is not None else None)


def _rows(parts: list[np.ndarray]) -> np.ndarray:
    """Records' probabilities as one array; records of different widths (a regression log without them) as (n, 0)."""
    if len({p.shape[1] for p in parts}) == 1:
        return np.concatenate(parts)
    return np.zeros((sum(len(p) for p in parts), 0), np.float32)
