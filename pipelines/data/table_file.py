"""A user's table (CSV or Parquet of named columns) → raw feature rows and the table's schema.

A table is not a sequence: its columns are unrelated measurements on their own scales, some
of them text, some cells empty. It is stored as it was read, one float32 column per file
column, so the graph that is served takes exactly what a client sends:

- a number column keeps its values, an empty cell is NaN;
- a text column (at most ``data.sequence.max_categories`` distinct values) holds the index of
  its value in the column's vocabulary, sorted; an empty cell is NaN.

What a network learns from (the training split's median for an empty cell and a 0/1
missing-indicator, per-column scaling, one-hot codes) is computed from these inside the
exported graph (models/preprocess.py), with statistics fitted on the training split only.
The schema read here (names, order, types, vocabularies, missing counts) is recorded in the
dataset's manifest and becomes part of the model's input contract.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.errors import FluxoError

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.settings import SequenceSettings

log = logging.getLogger(__name__)

# A column is read as numbers when at least this share of its filled cells parse as numbers: the
# rest are then typos to name one by one, not categories.
_MOSTLY_NUMBERS = 0.9
_STEP_NAME = re.compile(r"^(.*?)(\d+)$")


def numbered_steps(columns: list[str]) -> bool:
    """True for columns named as steps: one prefix and consecutive numbers from 0 or 1 (t0, t1, ... or 1, 2, ...)."""
    if len(columns) < 2:
        return False
    matches = [_STEP_NAME.match(str(name)) for name in columns]
    if not all(matches):
        return False
    prefixes = {m.group(1) for m in matches if m}
    numbers = [int(m.group(2)) for m in matches if m]
    return len(prefixes) == 1 and numbers[0] in (0, 1) and numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def choose_kind(frame: "pd.DataFrame", settings: "SequenceSettings", model_name: str | None) -> tuple[str, str]:
    """``table`` or ``sequence`` for a CSV/Parquet file's feature columns, and why, in words for the log."""
    import pandas as pd

    if settings.kind != "auto":
        return settings.kind, f"data.sequence.kind={settings.kind}"
    if model_name:
        from models import MODEL_REGISTRY

        spec = MODEL_REGISTRY.get(model_name)
        if spec is not None and spec.input_kind in ("table", "sequence"):
            return spec.input_kind, f"model.name={model_name} takes {spec.input_kind} inputs"
    if frame.shape[1] == 1 and frame.iloc[:, 0].map(lambda v: isinstance(v, (list, np.ndarray))).all():
        return "sequence", "its one feature column holds lists"
    names = [str(c) for c in frame.columns]
    if numbered_steps(names):
        return "sequence", f"its columns are numbered steps ({names[0]} ... {names[-1]})"
    text = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if not text and _ragged(frame.to_numpy(dtype=np.float64)):
        return "sequence", "its rows end at different columns (trailing empty cells)"
    return "table", "its columns are named features"


def _ragged(values: np.ndarray) -> bool:
    """Rows whose empty cells are all trailing, at three lengths or more: sequences padded at the end.

    Two lengths are not enough: a table whose last column alone has empty cells looks the same.
    """
    empty = np.isnan(values)
    if not empty.any():
        return False
    filled_after = np.flip(np.logical_or.accumulate(np.flip(~empty, 1), 1), 1)  # a filled cell at or after it
    if (empty & filled_after).any():
        return False
    return len(np.unique(values.shape[1] - empty.sum(axis=1))) >= 3


def read_table(path: Path, frame: "pd.DataFrame", settings: "SequenceSettings",
               not_numbers: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """(N, F) float32 raw rows and the schema; refuses what a table cannot hold, naming the column.

    ``not_numbers(path, frame, columns)`` is the sequence reader's cell-by-cell message for
    number columns with a few cells that are not numbers (a typo is fixed cell by cell).
    """
    import pandas as pd

    if frame.shape[1] == 0:
        raise FluxoError(f"{path}: no feature columns besides the label column {settings.label_column!r}")
    x = np.empty(frame.shape, dtype=np.float32)
    columns: list[dict[str, Any]] = []
    typos: list[Any] = []
    too_many: list[str] = []
    for position, column in enumerate(frame.columns):
        values = frame[column]
        name = str(column)
        filled = values.notna()
        if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
            x[:, position] = values.astype("float64").to_numpy()
            columns.append({"name": name, "type": "number", "missing": int((~filled).sum())})
            continue
        numeric = pd.to_numeric(values, errors="coerce")
        if filled.sum() and numeric[filled].notna().mean() >= _MOSTLY_NUMBERS:
            typos.append(column)
            continue
        text = values[filled].astype(str).str.strip()
        vocabulary = sorted(text.unique().tolist())
        if len(vocabulary) > settings.max_categories:
            too_many.append(f"{name!r} ({len(vocabulary)} distinct values)")
            continue
        codes = pd.Series(np.nan, index=values.index)
        codes[filled] = text.map({value: i for i, value in enumerate(vocabulary)})
        x[:, position] = codes.to_numpy(dtype=np.float64)
        columns.append({"name": name, "type": "category", "categories": vocabulary, "missing": int((~filled).sum())})
    if typos:
        raise FluxoError(not_numbers(path, frame, typos))
    if too_many:
        raise FluxoError(
            f"{path}: text column {', '.join(too_many)} has more distinct values than data.sequence.max_categories="
            f"{settings.max_categories} allows to one-hot encode; remove the column (an identifier or free text "
            "predicts nothing the model can serve) or raise data.sequence.max_categories"
        )
    _check_missing(path, columns, settings)
    schema = {"columns": columns, "missing": settings.missing, "unseen_category": settings.unseen_category,
              "scaling": settings.scaling, "as_steps": _as_steps(columns, settings)}
    categories = [c["name"] for c in columns if c["type"] == "category"]
    log.info("%s: a table of %d columns (%d numbers, %d text one-hot encoded%s)", path, len(columns),
             len(columns) - len(categories), len(categories), f": {', '.join(categories)}" if categories else "")
    return x, schema


def _as_steps(columns: list[dict[str, Any]], settings: "SequenceSettings") -> bool:
    """Whether sequence models may also read this table's columns as steps: only when nobody said it is a
    table (data.sequence.kind=auto) and every column is a number with no empty cell (what a sequence holds).
    ``model.name=auto`` then races them beside the table models, and the validation split decides."""
    return settings.kind == "auto" and len(columns) > 1 and all(
        c["type"] == "number" and not c["missing"] for c in columns)


def _check_missing(path: Path, columns: list[dict[str, Any]], settings: "SequenceSettings") -> None:
    """Empty cells: refused by policy, naming the columns, or imputed, said in one line per run."""
    holes = [(c["name"], c["missing"]) for c in columns if c["missing"]]
    if not holes:
        return
    listed = ", ".join(f"{name!r} ({count})" for name, count in holes[:10])
    listed += f" and {len(holes) - 10} more columns" if len(holes) > 10 else ""
    if settings.missing == "refuse":
        raise FluxoError(f"{path}: empty cells in column {listed}; data.sequence.missing=refuse: fill them, or set "
                         "data.sequence.missing=impute (the training median plus a missing-indicator, in the graph)")
    log.info("%s: empty cells in %s: imputed with the training split's median, with a missing-indicator "
             "feature each (data.sequence.missing=impute)", path, listed)
