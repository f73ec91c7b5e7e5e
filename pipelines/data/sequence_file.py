"""A user's file (CSV, NPZ or Parquet) → (N, C, L) float32 sequences, or a table, and targets.

Wide CSV/Parquet: one row per sample, the label column plus one column per time
step; trailing empty cells are padding, so rows may have different lengths.
Parquet may instead hold one list column per sample. NPZ holds ``x`` as (N, L)
or (N, C, L), the targets under the label name (or ``y`` when the file holds only
``x`` and ``y``), and optionally ``lengths``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.data.npz import read_npz
from pipelines.data.raw import Problem, RawDataset
from pipelines.errors import FluxoError

if TYPE_CHECKING:
    from pipelines.settings import SequenceSettings

log = logging.getLogger(__name__)


def _targets(
    values: np.ndarray, path: Path, settings: "SequenceSettings"
) -> tuple[np.ndarray, list[str], str, np.ndarray]:
    """Class indices and names, or float regression targets, and a mask of samples with no target.

    Missing targets are returned, not raised: validation reports them with the file's other
    problems (NaN steps, an imbalance...) so one run names everything to fix.
    """
    import pandas as pd

    series = pd.Series(values)
    missing = series.isna().to_numpy()
    present = series[~missing]
    numeric = pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)
    integral = numeric and np.all(np.mod(present.to_numpy(dtype=float), 1) == 0)
    task = settings.target
    if task == "auto":
        task = "regression" if numeric and not integral else "classification"
        if task == "classification" and numeric:
            task = _integers_as(present, path, settings)
    if task == "regression":
        if not numeric:
            raise FluxoError(f"{path}: sequence.target=regression but {settings.label_column!r} is not numeric")
        return series.fillna(0).to_numpy(dtype=np.float32), ["target"], "regression", missing
    classes = sorted(present.unique().tolist(), key=lambda v: (str(type(v)), v))
    index = {value: i for i, value in enumerate(classes)}
    y = np.array([0 if gone else index[v] for v, gone in zip(series.tolist(), missing)], dtype=np.int64)
    return y, [str(c) for c in classes], "classification", missing


def _integers_as(present: Any, path: Path, settings: "SequenceSettings") -> str:
    """Integer targets are classes only when few distinct values stand for many rows (the rule in
    SequenceSettings.MAX_CLASSES); the decision is said in one line with the setting that overrides it."""
    distinct, rows = int(present.nunique()), len(present)
    limit = max(settings.MAX_CLASSES, int(np.sqrt(rows)))
    if distinct <= limit:
        return "classification"
    log.info("%s: %r holds %d distinct integers in %d rows (more than %d): read as a regression target; set "
             "data.sequence.target=classification to treat them as classes", path, settings.label_column, distinct,
             rows, limit)
    return "regression"


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


def _frame(path: Path, settings: "SequenceSettings") -> tuple[Any, np.ndarray]:
    """The file's feature columns and its targets."""
    import pandas as pd

    try:
        frame = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except Exception as error:  # pandas/pyarrow raise many types for a malformed file
        raise FluxoError(f"{path}: cannot be read as {path.suffix[1:].upper()} ({error})") from error
    if settings.label_column not in frame.columns:
        raise FluxoError(_no_label(path, "column", settings.label_column, [str(c) for c in frame.columns]))
    return frame, frame.pop(settings.label_column).to_numpy()


def _sequences(path: Path, frame: Any, settings: "SequenceSettings") -> tuple[np.ndarray, np.ndarray | None]:
    """Feature columns read as one step each (or one list column): (N, 1, L) padded, and lengths."""
    import pandas as pd

    if frame.shape[1] == 1 and frame.iloc[:, 0].map(lambda v: isinstance(v, (list, np.ndarray))).all():
        return _from_lists(frame.iloc[:, 0])
    text = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if text:
        raise FluxoError(_not_numbers(path, frame, text, settings.label_column))
    return _from_rows(frame.to_numpy(dtype=np.float64))


def _not_numbers(path: Path, frame: Any, columns: list[Any], label: str) -> str:
    """The message for step cells that are not numbers: the first one by file order, its line,
    column and value, how many more there are, and the fix.

    A user fixes a file cell by cell, so the column name alone (a column of 10,000 rows with
    one typo) is not enough to find it.
    """
    import pandas as pd

    first: tuple[int, int, Any] | None = None  # (row position, column position, column)
    bad_cells = 0
    all_text: dict[Any, bool] = {}
    for position, column in enumerate(columns):
        values = frame[column]
        bad = (values.notna() & pd.to_numeric(values, errors="coerce").isna()).to_numpy()
        bad_cells += int(bad.sum())
        all_text[column] = bool(bad.sum() == values.notna().sum())
        rows = np.flatnonzero(bad)
        if len(rows) and (first is None or (rows[0], position) < first[:2]):
            first = (int(rows[0]), position, column)
    assert first is not None  # a column is only non-numeric when some cell is not a number
    row, _, column = first
    value = frame[column].iloc[row]
    lines = _csv_lines(path, len(frame)) if path.suffix.lower() == ".csv" else None
    where = f"line {lines[row]}" if lines is not None else f"row {row + 1}"
    others = bad_cells - 1
    more = f" ({others} more {'cell is' if others == 1 else 'cells are'} not a number either)" if others else ""
    if all_text[column]:
        fix = (f"no value of {str(column)!r} is a number: remove that column from the file, or set "
               f"data.sequence.label_column={column} if it holds the targets (now {label!r})")
    else:
        fix = ("every step must be a number: correct the cell, or empty it (empty cells at a row's end are "
               "padding; an empty cell inside a row is NaN, which data.validation.non_finite=skip drops with its row)")
    return f"{path}, {where}, column {str(column)!r}: {str(value)!r} is not a number{more}; {fix}"


def _csv_lines(path: Path, rows: int) -> list[int] | None:
    """The 1-based file line each data row starts on, counted as pandas reads rows (header first,
    blank lines skipped); None when the file cannot be matched row for row."""
    import csv

    starts, previous = [], 0
    try:
        with path.open(newline="", encoding="utf-8", errors="replace") as handle:
            reader = csv.reader(handle)
            for record in reader:
                if record:
                    starts.append(previous + 1)
                previous = reader.line_num
    except (OSError, csv.Error):
        return None
    return starts[1:] if len(starts) - 1 == rows else None


def _typos_message(label: str) -> Any:
    """:func:`_not_numbers` for the table reader, which names the number columns with a few typos."""
    return lambda path, frame, columns: _not_numbers(path, frame, columns, label)


_CONVENTIONAL_LABELS = ("label", "labels", "target", "y", "class")


def _no_label(path: Path, kind: str, label: str, names: list[str]) -> str:
    """The message for a missing label column/array: what the file holds and the setting that fixes it."""
    shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    likely = [n for n in names if n.lower() in _CONVENTIONAL_LABELS]
    others = [n for n in names if n not in ("x", "lengths")] if kind == "array" else []
    example = (likely or others or ["<name>"])[0]
    return (
        f"{path}: no label {kind} {label!r}; {kind}s are {shown}; set "
        f"data.sequence.label_column to the {kind} holding the targets (e.g. data.sequence.label_column={example})"
    )


def _npz_label(path: Path, arrays: list[str], label: str, chosen: bool) -> str:
    """The configured label array, or ``y`` where the file holds just ``x`` and ``y`` (plus ``lengths``).

    The ``y`` convention stands in only for the default name: a label the user set (``chosen``)
    and the file lacks is an error naming the arrays there are, never silently replaced.
    """
    if label in arrays:
        return label
    if not chosen and set(arrays) - {"x", "lengths"} == {"y"}:
        log.info("%s: no %r array; taking the targets from 'y' (x/y convention)", path, label)
        return "y"
    raise FluxoError(_no_label(path, "array", label, arrays))


def _npz(path: Path, settings: "SequenceSettings") -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    arrays = read_npz(path, "sequences")
    # Settings are validated from a full dump of the defaults, so "set by the user" is "not the default".
    chosen = settings.label_column != type(settings).model_fields["label_column"].default
    label = _npz_label(path, list(arrays), settings.label_column, chosen)
    x = arrays["x"].astype(np.float32)
    targets = arrays[label]
    lengths = arrays["lengths"].astype(np.int64) if "lengths" in arrays else None
    if x.ndim == 2:
        x = x[:, None, :]
    if x.ndim != 3:
        raise FluxoError(f"{path}: 'x' has shape {x.shape}; expected (N, L) or (N, C, L)")
    if lengths is not None and (len(lengths) != len(x) or lengths.min() < 1 or lengths.max() > x.shape[2]):
        raise FluxoError(f"{path}: 'lengths' must hold one value in 1..{x.shape[2]} per sample")
    return x, lengths, targets


def load_sequence_file(path: Path, settings: "SequenceSettings", model_name: str | None = None) -> RawDataset:
    """Read a table or sequences, and targets; NaN steps and missing targets are left to validation,
    which reports them together with every other problem the file has.

    A CSV or Parquet file is a table or sequences by ``data.sequence.kind``
    (pipelines/data/table_file.py's ``choose_kind``; ``model_name``, the run's model.name,
    decides when it names a table or sequence model); an NPZ file holds sequences.
    """
    from pipelines.data.table_file import choose_kind, read_table
    from pipelines.settings import dataset_display_name

    kind, schema = "sequence", None
    if path.suffix.lower() == ".npz":
        x, lengths, targets = _npz(path, settings)
    else:
        frame, targets = _frame(path, settings)
        kind, why = choose_kind(frame, settings, model_name)
        log.info("%s: read as a %s (%s; data.sequence.kind chooses)", path, kind, why)
        if kind == "table":
            (x, schema), lengths = read_table(path, frame, settings, _typos_message(settings.label_column)), None
        else:
            x, lengths = _sequences(path, frame, settings)
    if len(targets) != len(x):
        raise FluxoError(f"{path}: {len(x)} sequences but {len(targets)} targets")
    if len(x) == 0:
        raise FluxoError(f"{path}: no samples")
    y, labels, task, missing = _targets(targets, path, settings)
    ids = [f"row {i}" for i in range(len(x))]
    problems = []
    if missing.any():
        no_target = [ids[i] for i in np.flatnonzero(missing)]
        problems.append(Problem("missing_label", f"samples have no {settings.label_column!r} value", no_target))
    if schema is not None:
        log.info("read %d rows of %d columns from %s (%s)", len(x), x.shape[1], path, task)
        preprocessing = {"table": schema}
    else:
        log.info("read %d sequences of up to %d steps from %s (%s)", len(x), x.shape[2], path, task)
        preprocessing = {"variable_length": lengths is not None, "padding": "zeros after each sequence's length"}
    return RawDataset(
        name=dataset_display_name(str(path)),
        kind=kind,
        x=x,
        y=y,
        labels=labels,
        task=task,
        lengths=lengths,
        ids=ids,
        description=f"{'table' if schema is not None else 'sequence file'} {path}",
        preprocessing=preprocessing,
        problems=problems,
        readable=~missing if missing.any() else None,
    )
