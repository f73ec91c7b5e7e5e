"""A table model's rows as clients write them (lists or objects keyed by column name) ↔ the graph's input.

The graph of a table model (models/preprocess.py's TableInput) takes one float32 per column:
a number column's value, NaN for an empty cell; a category column's index in its vocabulary,
NaN for an empty cell or an unseen value. Clients write the values themselves, a category
as its text, an empty cell as null.

One encoding, three readers: ``POST /predict`` (:func:`validate_rows`), v2 inference
(:func:`validate_table_tensor`, codes already encoded) and ``fluxo predict`` on a CSV or
Parquet file (:func:`encode_frame`, vectorised with pandas, the same cells refused with the
same sentences, since each refused cell is described by the service's own :func:`cell_value`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from serving.contract import TableColumn, TableInput
from serving.schemas import InvalidInstances, TooManyInstances, _describe, validate_instances

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_NAN = float("nan")
_SHOWN = 10  # vocabulary values or column names listed in a message before "... (N in all)"


def row_object(values: Any, table: TableInput) -> dict[str, Any]:
    """One raw row (floats, NaN for empty, codes for categories) as a client sends it: {column: value}."""
    row: dict[str, Any] = {}
    for value, column in zip(list(values), table.columns):
        value = float(value)
        if math.isnan(value):
            row[column.name] = None
        elif column.type == "category":
            row[column.name] = (column.categories or [])[int(value)]
        else:
            row[column.name] = int(value) if value.is_integer() and abs(value) < 2**53 else value
    return row


def _listed(values: Sequence[str]) -> str:
    """``'a', 'b', ...`` shortened: at most :data:`_SHOWN` values, each at most 40 characters."""
    shown = ", ".join(repr(str(v)[:40]) for v in values[:_SHOWN])
    return shown + (f", ... ({len(values)} in all)" if len(values) > _SHOWN else "")


class CellProblem(ValueError):
    """One cell a column cannot take; the message starts at the column (``column 'x' is ...``)."""


class TableRows:
    """A table's columns prepared once for encoding many rows: positions, vocabularies, policies.

    :class:`serving.runtime.OnnxModel` builds one at load time (``table_rows``), so a request
    pays no set-up; :func:`validate_rows` builds one itself when handed a :class:`TableInput`.
    """

    def __init__(self, table: TableInput) -> None:
        self.table = table
        self.columns: list[TableColumn] = list(table.columns)
        self.names: list[str] = [c.name for c in self.columns]
        self.width = len(self.columns)
        self.position: dict[str, int] = {name: i for i, name in enumerate(self.names)}
        self.vocabularies: list[dict[str, int] | None] = [
            {value: code for code, value in enumerate(c.categories or [])} if c.type == "category" else None
            for c in self.columns
        ]
        self.impute = table.missing == "impute"
        self.refuse_unseen = table.unseen_category == "refuse"
        self.all_numbers = all(c.type == "number" for c in self.columns)

    def names_listed(self) -> str:
        return _listed(self.names)

    def cell_value(self, j: int, value: Any) -> tuple[float, bool]:
        """(the graph's float for ``value`` in column ``j``, True when it is an unseen category ignored),
        or CellProblem naming the column, the value and the fix."""
        column = self.columns[j]
        kind = type(value)
        if value is None:
            if self.impute:
                return _NAN, False
            what = "a number" if column.type == "number" else f"one of {_listed(column.categories or [])}"
            raise CellProblem(f"column {column.name!r} is null; this model refuses empty values "
                              f"(data.sequence.missing=refuse at training): send {what}")
        vocabulary = self.vocabularies[j]
        if vocabulary is None:  # a number column
            if kind is float or kind is int:
                try:
                    number = float(value)
                except OverflowError:
                    number = math.inf
                if math.isfinite(number) and abs(number) <= _FLOAT32_MAX:
                    return number, False
                if math.isnan(number) or math.isinf(number) and kind is float:
                    raise CellProblem(f"column {column.name!r} is {_describe(value)}; values must be finite numbers"
                                      + (" (null for an empty value)" if self.impute else ""))
                raise CellProblem(f"column {column.name!r} is {_describe(value)}, outside the float32 range; "
                                  "expected a finite number" + (" (null for an empty value)" if self.impute else ""))
            raise CellProblem(f"column {column.name!r} is {_describe(value)}, expected a number"
                              + (" (null for an empty value)" if self.impute else ""))
        categories = column.categories or []
        if kind is str:
            code = vocabulary.get(value)
            if code is None:
                code = vocabulary.get(value.strip())  # training read the text stripped (pipelines/data/table_file.py)
            if code is not None:
                return float(code), False
            if not self.refuse_unseen:
                return _NAN, True
            raise CellProblem(f"column {column.name!r} is {value[:40]!r}, a value training never saw "
                              f"(unseen_category=refuse); expected one of {_listed(categories)}")
        if kind is int or kind is float:  # a category written as a number: its text, if that is in the vocabulary
            code = vocabulary.get(str(value))
            if code is not None:
                return float(code), False
            raise CellProblem(f"column {column.name!r} is {_describe(value)}, expected one of {_listed(categories)} "
                              "(a category is sent as its text, not its code)")
        raise CellProblem(f"column {column.name!r} is {_describe(value)}, expected one of {_listed(categories)}"
                          + (" (null for an empty value)" if self.impute else ""))

    def row_values(self, row: Any, where: str) -> Sequence[Any]:
        """A row's values in column order (a list, or an object keyed by column name), or InvalidInstances."""
        if isinstance(row, list):
            if len(row) != self.width:
                raise InvalidInstances(f"{where} has {len(row)} values, expected {self.width}, one per column in "
                                       f"this order: {self.names_listed()} (or send an object keyed by column name)")
            return row
        if isinstance(row, dict):
            if len(row) == self.width:
                try:
                    return [row[name] for name in self.names]
                except KeyError:
                    pass
            for key in row:
                if key not in self.position:
                    raise InvalidInstances(f"{where} has the key {str(key)[:40]!r}, not a column of this model; "
                                           f"its columns are {self.names_listed()}")
            absent = [name for name in self.names if name not in row]
            raise InvalidInstances(f"{where} has no {absent[0]!r}: every column is required"
                                   + (" (null for an empty value)" if self.impute else "")
                                   + (f"; {len(absent)} columns are missing" if len(absent) > 1 else ""))
        raise InvalidInstances(f"{where} is {_describe(row)}, expected an object keyed by column name "
                               f"or a list of {self.width} values in column order ({self.names_listed()})")


def table_rows(table: TableInput | TableRows) -> TableRows:
    return table if isinstance(table, TableRows) else TableRows(table)


def validate_rows(instances: Any, table: TableInput | TableRows, max_instances: int,
                  numbers_only: bool = False) -> tuple[np.ndarray, dict[str, int]]:
    """``POST /predict``'s instances for a table model → ((n, F) float32 graph input, unseen values per column).

    Each instance is a list of F values in column order or an object keyed by column name
    (every column present, no other key; key order free); both give the same row. A number
    column takes a JSON number (not a boolean, not a string) within float32; a category column
    its text (a number whose text is in the vocabulary also does); null is an empty value:
    NaN, which the graph imputes, under ``missing: impute``, else refused. A category value
    training never saw is NaN (no category) and counted under ``unseen_category: ignore``, else
    refused. Every refusal is InvalidInstances naming ``instances[i]``, the column, the value
    and what the column takes. Work is one pass over the values (the body size is capped upstream).
    ``numbers_only`` (serving/schemas.only_numbers): a body of numbers alone, for a table of
    number columns, is converted in one step, as validate_instances does.
    """
    rows = table_rows(table)
    if not isinstance(instances, list):
        raise InvalidInstances(f"instances must be a list of instances, got {_describe(instances)}")
    if not instances:
        raise InvalidInstances("instances is empty; send at least one row (an object keyed by column name, or a "
                               "list of values in column order)")
    if len(instances) > max_instances:
        raise TooManyInstances(
            f"instances has {len(instances)} items, more than the limit of {max_instances} per request "
            "(FLUXO_MAX_INSTANCES); split the request"
        )
    if numbers_only and rows.all_numbers:
        try:
            return validate_instances(instances, (rows.width,), max_instances, True), {}
        except InvalidInstances:
            pass  # the loop below names the cell in its own words
    out = np.empty((len(instances), rows.width), dtype=np.float32)
    unseen: dict[str, int] = {}
    cell_value = rows.cell_value
    for i, instance in enumerate(instances):
        values = rows.row_values(instance, f"instances[{i}]")
        for j, value in enumerate(values):
            kind = type(value)
            if (kind is float or kind is int) and -_FLOAT32_MAX <= value <= _FLOAT32_MAX and rows.vocabularies[j] is None:
                out[i, j] = value  # the common cell, without a call (NaN fails the comparison)
                continue
            try:
                out[i, j], ignored = cell_value(j, value)
            except CellProblem as problem:
                raise InvalidInstances(f"instances[{i}]: {problem}") from None
            if ignored:
                name = rows.names[j]
                unseen[name] = unseen.get(name, 0) + 1
    return out, unseen


def validate_table_tensor(tensor: Any, where: str, input_name: str, table: TableInput | TableRows,
                          max_instances: int) -> np.ndarray:
    """A v2 input tensor for a table model → (n, F) float32, or InvalidInstances.

    The Open Inference Protocol sends the graph's own input: FP32 ``[n, F]``, one value per
    column in GET /v2/models/{name}'s ``parameters.table`` order, a category as its *code*
    (its index in the column's ``categories``), not its text. An empty value is JSON ``null``
    (or NaN in a binary tensor): accepted, as NaN the graph imputes, when the model imputes
    (``missing: impute``), else refused naming the column. A category code must be a whole
    number in 0..len(categories)-1: an unseen value has no code, so none is counted here
    (send it to ``POST /predict`` as text to have it ignored and counted).
    """
    rows = table_rows(table)
    shape = (rows.width,)
    empty = None
    if isinstance(tensor, dict):
        data = tensor.get("data")
        if isinstance(data, np.ndarray) and data.dtype.kind == "f":  # binary: NaN is an empty value
            empty = np.isnan(data)
            if empty.any():
                tensor = {**tensor, "data": np.where(empty, np.float32(0), data)}
            else:
                empty = None
        elif isinstance(data, list) and any(v is None or (type(v) is list and None in v) for v in data):
            flat = [v for item in data for v in item] if all(type(v) is list for v in data) else list(data)
            empty = np.array([v is None for v in flat], dtype=bool)
            tensor = {**tensor, "data": [0.0 if v is None else v for v in flat]}
    from serving.schemas import validate_tensor

    batch = validate_tensor(tensor, where, input_name, shape, max_instances)
    if empty is not None:
        if empty.size != batch.size:  # not reached: validate_tensor checked the count
            raise InvalidInstances(f"{where}.data does not hold {batch.size} values")
        batch = np.array(batch, dtype=np.float32)  # a copy: binary data is a read-only view
        batch[empty.reshape(batch.shape)] = np.nan
        if not rows.impute:
            i, j = (int(k) for k in np.argwhere(np.isnan(batch))[0])
            raise InvalidInstances(f"{where}: instance {i} column {rows.names[j]!r} is null; this model refuses "
                                   "empty values (data.sequence.missing=refuse at training): send a number")
    for j, vocabulary in enumerate(rows.vocabularies):
        if vocabulary is None:
            continue
        codes = batch[:, j]
        bad = ~np.isnan(codes) & ((codes < 0) | (codes >= len(vocabulary)) | (codes != np.floor(codes)))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InvalidInstances(
                f"{where}: instance {i} column {rows.names[j]!r} is {float(codes[i])!r}, not a category code; "
                f"send the index (0..{len(vocabulary) - 1}) of one of {_listed(rows.columns[j].categories or [])}")
    return batch


def encode_frame(frame: Any, table: TableInput | TableRows,
                 where: str = "the file") -> tuple[np.ndarray, dict[int, str], dict[str, int]]:
    """A pandas frame holding the model's columns by name → ((n, F) float32, {row position: why}, unseen counts).

    The service's encoding, vectorised: a number column's empty cell (NaN) is NaN or a problem by
    ``missing``; a cell that is not a number, or is outside float32, is that row's problem; a
    category column's text (stripped, as training read it) is its code, an empty cell as a number's,
    an unseen value NaN and counted or a problem by ``unseen_category``. Columns not of the model
    are ignored; a missing column is a :class:`KeyError`-free ValueError naming it and ``where``.
    Each refused cell is described by :meth:`TableRows.cell_value`, so a row refused here reads
    as ``POST /predict`` would refuse it. A boolean column is read as 0/1, as training read it.
    """
    import pandas as pd

    rows = table_rows(table)
    absent = [name for name in rows.names if name not in frame.columns]
    if absent:
        raise ValueError(f"{where} has no column {absent[0]!r}"
                         + (f" (nor {_listed(absent[1:])})" if len(absent) > 1 else "")
                         + f"; the model reads the columns {rows.names_listed()} by name (others are ignored)")
    n = len(frame)
    out = np.empty((n, rows.width), dtype=np.float32)
    problems: dict[int, str] = {}
    unseen: dict[str, int] = {}

    def refuse(positions: np.ndarray, j: int, column: Any) -> None:
        for i in positions.tolist():
            if i in problems:
                continue
            value = column.iloc[i]
            value = None if value is None or (isinstance(value, float) and math.isnan(value)) else value
            if isinstance(value, np.generic):
                value = value.item()
            try:
                rows.cell_value(j, value)
                problems[i] = f"column {rows.names[j]!r} holds {str(value)[:40]!r}, which the service refuses"
            except CellProblem as problem:
                problems[i] = str(problem).replace(" is null;", " is empty;", 1)

    for j, name in enumerate(rows.names):
        column = frame[name]
        if isinstance(column, pd.DataFrame):
            raise ValueError(f"{where} has the column {name!r} more than once; keep one")
        vocabulary = rows.vocabularies[j]
        if vocabulary is None:
            if pd.api.types.is_bool_dtype(column) or pd.api.types.is_numeric_dtype(column):
                values = column.astype("float64").to_numpy()
                not_number = np.zeros(n, dtype=bool)
            else:
                values = pd.to_numeric(column, errors="coerce").astype("float64").to_numpy()
                not_number = np.isnan(values) & column.notna().to_numpy()
            empty = np.isnan(values) & ~not_number
            with np.errstate(invalid="ignore"):
                too_big = ~np.isnan(values) & ~(np.abs(values) <= _FLOAT32_MAX)
            bad = not_number | too_big | (empty if not rows.impute else np.zeros(n, dtype=bool))
            if bad.any():
                refuse(np.flatnonzero(bad), j, column)
            with np.errstate(over="ignore"):
                out[:, j] = np.where(bad, np.nan, values)
            continue
        filled = column.notna().to_numpy()
        text = column[filled].astype(str)
        codes = text.map(vocabulary)
        missed = codes.isna().to_numpy()
        if missed.any():  # stripped, as training read it
            codes[missed] = text[missed].str.strip().map(vocabulary)
        encoded = np.full(n, np.nan)
        encoded[filled] = codes.to_numpy(dtype=np.float64)
        unseen_rows = filled & np.isnan(encoded)
        bad = (unseen_rows if rows.refuse_unseen else np.zeros(n, dtype=bool)) | (~filled if not rows.impute
                                                                                  else np.zeros(n, dtype=bool))
        if bad.any():
            refuse(np.flatnonzero(bad), j, column)
        count = int((unseen_rows & ~bad).sum())
        if count:
            unseen[name] = count
        out[:, j] = encoded
    return out, problems, unseen
