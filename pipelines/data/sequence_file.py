"""A user's sequence file (CSV, NPZ or Parquet) → (N, C, L) float32 sequences and targets.

Wide CSV/Parquet: one row per sample, the label column plus one column per time
step; trailing empty cells are padding, so rows may have different lengths.
Parquet may instead hold one list column per sample. NPZ holds ``x`` as (N, L)
or (N, C, L), the targets under the label name, and optionally ``lengths``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.data.sources import RawDataset
from pipelines.errors import FluxoError

if TYPE_CHECKING:
    from pipelines.settings import SequenceSettings

log = logging.getLogger(__name__)


def _targets(values: np.ndarray, path: Path, settings: "SequenceSettings") -> tuple[np.ndarray, list[str], str]:
    """Class indices and names, or float regression targets; missing targets are an error."""
    import pandas as pd

    series = pd.Series(values)
    missing = np.flatnonzero(series.isna().to_numpy())
    if len(missing):
        rows = ", ".join(str(i) for i in missing[:10])
        raise FluxoError(f"{path}: {len(missing)} samples have no {settings.label_column!r} value (rows {rows}); fill or drop them")
    numeric = pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)
    integral = numeric and np.all(np.mod(series.to_numpy(dtype=float), 1) == 0)
    task = settings.target
    if task == "auto":
        task = "regression" if numeric and not integral else "classification"
    if task == "regression":
        if not numeric:
            raise FluxoError(f"{path}: sequence.target=regression but {settings.label_column!r} is not numeric")
        return series.to_numpy(dtype=np.float32), ["target"], "regression"
    classes = sorted(series.unique().tolist(), key=lambda v: (str(type(v)), v))
    index = {value: i for i, value in enumerate(classes)}
    return np.array([index[v] for v in series.tolist()], dtype=np.int64), [str(c) for c in classes], "classification"


def _from_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, L) with trailing NaN as padding → zero-padded (N, 1, L) and lengths (None if all full)."""
    finite_or_interior = ~np.isnan(rows)
    # A row's length runs to its last present value; NaN before that is a real NaN.
    lengths = np.where(finite_or_interior.any(1), rows.shape[1] - np.argmax(finite_or_interior[:, ::-1], axis=1), 0)
    padded = rows.copy()
    steps = np.arange(rows.shape[1])[None, :]
    padded[steps >= lengths[:, None]] = 0.0
    variable = bool((lengths != rows.shape[1]).any())
    return padded[:, None, :].astype(np.float32), (lengths.astype(np.int64) if variable else None)


def _from_lists(column: Any) -> tuple[np.ndarray, np.ndarray]:
    sequences = [np.asarray(v, dtype=np.float32) for v in column]
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    out = np.zeros((len(sequences), 1, int(lengths.max(initial=0))), dtype=np.float32)
    for i, sequence in enumerate(sequences):
        out[i, 0, : len(sequence)] = sequence
    return out, lengths


def _table(path: Path, settings: "SequenceSettings") -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    import pandas as pd

    try:
        frame = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except Exception as error:  # pandas/pyarrow raise many types for a malformed file
        raise FluxoError(f"{path}: cannot be read as {path.suffix[1:].upper()} ({error})") from error
    if settings.label_column not in frame.columns:
        raise FluxoError(
            f"{path}: no label column {settings.label_column!r}; columns are {', '.join(map(str, frame.columns[:12]))}"
            " (set data.sequence.label_column)"
        )
    targets = frame.pop(settings.label_column).to_numpy()
    if frame.shape[1] == 1 and frame.iloc[:, 0].map(lambda v: isinstance(v, (list, np.ndarray))).all():
        x, lengths = _from_lists(frame.iloc[:, 0])
        return x, lengths, targets
    text = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if text:
        raise FluxoError(f"{path}: non-numeric feature columns {', '.join(map(str, text[:10]))}; every step must be a number")
    x, lengths = _from_rows(frame.to_numpy(dtype=np.float64))
    return x, lengths, targets


def _npz(path: Path, settings: "SequenceSettings") -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise FluxoError(f"{path}: not a readable NPZ file ({error})") from error
    with archive:
        if "x" not in archive or settings.label_column not in archive:
            raise FluxoError(
                f"{path}: needs arrays 'x' and {settings.label_column!r}; found {', '.join(archive.files)}"
            )
        x = archive["x"].astype(np.float32)
        targets = archive[settings.label_column]
        lengths = archive["lengths"].astype(np.int64) if "lengths" in archive else None
    if x.ndim == 2:
        x = x[:, None, :]
    if x.ndim != 3:
        raise FluxoError(f"{path}: 'x' has shape {x.shape}; expected (N, L) or (N, C, L)")
    if lengths is not None and (len(lengths) != len(x) or lengths.min() < 1 or lengths.max() > x.shape[2]):
        raise FluxoError(f"{path}: 'lengths' must hold one value in 1..{x.shape[2]} per sample")
    return x, lengths, targets


def load_sequence_file(path: Path, settings: "SequenceSettings") -> RawDataset:
    """Read sequences and targets; shape and NaN problems are left to validation."""
    from pipelines.settings import dataset_display_name

    x, lengths, targets = _npz(path, settings) if path.suffix.lower() == ".npz" else _table(path, settings)
    if len(targets) != len(x):
        raise FluxoError(f"{path}: {len(x)} sequences but {len(targets)} targets")
    if len(x) == 0:
        raise FluxoError(f"{path}: no samples")
    y, labels, task = _targets(targets, path, settings)
    log.info("read %d sequences of up to %d steps from %s (%s)", len(x), x.shape[2], path, task)
    return RawDataset(
        name=dataset_display_name(str(path)),
        kind="sequence",
        x=x,
        y=y,
        labels=labels,
        task=task,
        lengths=lengths,
        ids=[f"row {i}" for i in range(len(x))],
        description=f"sequence file {path}",
        preprocessing={"variable_length": lengths is not None, "padding": "zeros after each sequence's length"},
    )
