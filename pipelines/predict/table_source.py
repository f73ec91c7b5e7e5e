"""A table model's CSV or Parquet input for ``fluxo predict``: the model's columns read by name and
encoded exactly as the service encodes a row (serving/table_rows.py), bad rows named."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import FluxoError
from pipelines.predict.chunk import Chunk, Contract, open_parquet


def _table_columns(path: Path, present: Sequence[Any], contract: Contract) -> tuple[list[str], str | None]:
    """(the file columns to read, the id column or None); a model column the file lacks is a FluxoError."""
    rows = contract.table
    names = [str(c) for c in present]
    absent = [name for name in rows.names if name not in names]
    if absent:
        also = f" (nor {', '.join(repr(a) for a in absent[1:6])}{', ...' if len(absent) > 6 else ''})" if len(absent) > 1 else ""
        raise FluxoError(f"{path}: no column {absent[0]!r}{also}; the model reads the columns "
                         f"{rows.names_listed()} by name (other columns, such as {contract.label_column!r}, "
                         f"are ignored); the file has {', '.join(repr(n[:40]) for n in names[:10])}"
                         f"{', ...' if len(names) > 10 else ''}")
    id_column = "id" if "id" in names and "id" not in rows.position else None
    return rows.names + ([id_column] if id_column else []), id_column


def _table_chunk(frame: Any, start: int, path: Path, contract: Contract, id_column: str | None) -> Chunk:
    """One frame of a table file → a Chunk: rows encoded as the service encodes them, bad rows named."""
    from serving.table_rows import encode_frame

    n = len(frame)
    ids = frame[id_column].astype(str).tolist() if id_column else [str(i) for i in range(start, start + n)]
    try:
        values, problems, unseen = encode_frame(frame, contract.table, str(path))
    except ValueError as error:  # a column twice (checked by name before: not a missing one)
        raise FluxoError(f"{path}: {error}") from error
    if not problems:
        return Chunk(ids, values, [], unseen)
    good = np.ones(n, dtype=bool)
    good[list(problems)] = False
    errors = [(ids[i], problems[i]) for i in sorted(problems)]
    return Chunk([ids[i] for i in np.flatnonzero(good)], np.ascontiguousarray(values[good]), errors, unseen)


def table_csv_chunks(path: Path, contract: Contract, batch_size: int) -> Iterator[Chunk]:
    """A table model's CSV: the model's columns read by name, a category column as text (never as numbers,
    so ``007`` stays the text training read), ``batch_size`` rows at a time."""
    import pandas as pd

    try:
        header = pd.read_csv(path, nrows=0).columns
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise FluxoError(f"{path}: cannot be read as CSV ({error}); the first line names the columns") from error
    usecols, id_column = _table_columns(path, header, contract)
    text = {c.name: str for c in contract.table.columns if c.type == "category"}
    if id_column:
        text[id_column] = str
    start = 0
    try:
        for frame in pd.read_csv(path, usecols=usecols, dtype=text, chunksize=batch_size):
            yield _table_chunk(frame, start, path, contract, id_column)
            start += len(frame)
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise FluxoError(f"{path}: cannot be read as CSV after row {start} ({error}); "
                         "every line needs the header's number of fields") from error


def table_parquet_chunks(path: Path, contract: Contract, batch_size: int, row_groups: Sequence[int] | None = None,
                         start: int = 0) -> Iterator[Chunk]:
    """A table model's Parquet file: the model's columns read by name, ``batch_size`` rows at a time.

    ``row_groups`` reads only those (one cluster task's share), ``start`` being the file row they begin at."""
    reader = open_parquet(path)
    columns, id_column = _table_columns(path, reader.schema_arrow.names, contract)
    for batch in reader.iter_batches(batch_size=batch_size, columns=columns, row_groups=row_groups):
        frame = batch.to_pandas()
        yield _table_chunk(frame, start, path, contract, id_column)
        start += len(frame)
