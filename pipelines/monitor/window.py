"""The window ``fluxo monitor`` tests: the newest logged instances one model version answered."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

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

    def __len__(self) -> int:
        return len(self.inputs)

    def as_dict(self) -> dict[str, object]:
        def text(moment: datetime | None) -> str | None:
            return None if moment is None else moment.isoformat(timespec="seconds")

        return {"start": text(self.start), "end": text(self.end), "instances": len(self), "requests": self.requests,
                "first_logged": text(self.first_seen), "last_logged": text(self.last_seen)}


def read_window(location: Path | str, model_name: str, model_version: str | None, input_shape: tuple[int, ...],
                hours: float, max_instances: int, now: datetime | None = None) -> Window:
    """The newest ``max_instances`` instances of ``model_name`` v``model_version`` logged in the last ``hours``.

    ``location`` is the payload log: a local directory or the ``s3://`` URL the service uploads to.

    Only the champion variant's answers count: a challenger's (canary) answers come from
    another model, so their probabilities are not this model's.
    """
    import pyarrow.compute as pc

    from serving.payload_log import read_payloads

    if "://" not in str(location) and not Path(location).is_dir():
        raise FluxoError(f"{location}: no payload log there; serve with --set serve.payload_log={location} "
                         "(or point monitor.payload_log at the directory the service writes)")
    end = now or datetime.now(UTC)
    start = end - timedelta(hours=hours)
    try:
        table = read_payloads(location, since=start.date())  # day folders before the window are not read
    except OSError as error:
        raise FluxoError(str(error)) from error
    keep = pc.and_(pc.equal(table["model_name"], model_name), pc.greater_equal(table["time"], start))
    keep = pc.and_(keep, pc.not_equal(table["variant"], "challenger"))
    if model_version is not None:
        keep = pc.and_(keep, pc.equal(table["model_version"], str(model_version)))
    table = table.filter(keep).sort_by([("time", "descending")])
    inputs, probabilities, times, requests = [], [], [], 0
    kept = 0
    for batch in table.to_batches():
        if kept >= max_instances:
            break
        for row_inputs, shape, row_probabilities, when in zip(
                batch["inputs"].to_numpy(zero_copy_only=False), batch["input_shape"].to_numpy(zero_copy_only=False),
                batch["probabilities"].to_numpy(zero_copy_only=False), batch["time"].to_pylist()):
            if kept >= max_instances:
                break
            if tuple(int(s) for s in shape[1:]) != tuple(input_shape):
                continue  # another contract under the same name (an old version's log)
            x = np.asarray(row_inputs, np.float32).reshape(-1, *input_shape)
            p = np.asarray(row_probabilities, np.float32).reshape(len(x), -1)
            take = min(len(x), max_instances - kept)
            inputs.append(x[:take])
            probabilities.append(p[:take])
            times.append(when)
            kept += take
            requests += 1
    if not inputs:
        empty = np.zeros((0, *input_shape), np.float32)
        return Window(empty, np.zeros((0, 0), np.float32), 0, start, end, None, None)
    return Window(np.concatenate(inputs), np.concatenate(probabilities), requests, start, end, min(times), max(times))
