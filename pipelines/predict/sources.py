"""Prediction inputs read in chunks: ``.npy``, NPZ, CSV, Parquet, an image folder or a folder of parts.

Every source yields :class:`Chunk` objects of at most ``batch_size`` instances, so a
file larger than memory streams through: ``.npy`` is read slice by slice after its
header (plain reads rather than a memory map, whose touched pages would count in the
process's resident memory until the kernel evicts them), CSV through pandas'
``chunksize``, Parquet through pyarrow's ``iter_batches``, images file by file. NPZ
archives are compressed zip members and cannot be sliced: their ``x`` is loaded whole.
A folder of ``.npy`` and Parquet parts (what a Spark or Ray job writes) is read part by part,
each row's id being its part's relative path, ``:``, and its id within the part.

Validation is the service's: rows go through ``serving.schemas.validate_instances``
(numbers) or ``serving.images.decode_image`` (files), so a row refused here would be
refused by ``POST /predict`` with the same sentence, and the reverse. A table model's CSV or
Parquet file is read by column name (``serving.table_rows.encode_frame``: the service's
encoding, vectorised): the model's columns in any order, other columns ignored.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.data.npz import read_npz
from pipelines.errors import FluxoError
from pipelines.predict.chunk import Chunk, Contract, open_parquet

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
TABLE_SUFFIXES = frozenset({".csv", ".parquet", ".pq"})
ARRAY_SUFFIXES = frozenset({".npy", ".npz"})
PART_SUFFIXES = frozenset({".npy", ".parquet", ".pq"})  # what a folder of parts holds: files that stream
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _service_problem(row: np.ndarray, shape: tuple[int, ...]) -> str:
    """The service's own sentence for a row the fast check flagged (validate_instances is the judge)."""
    from serving.schemas import InvalidInstances, validate_instances

    try:
        validate_instances([row.tolist()], shape, 1)
    except InvalidInstances as error:
        return str(error).replace("instances[0]", "instance", 1)
    return "refused by the fast check but accepted by the service"  # not reached: same criteria


def validate_rows(values: np.ndarray, ids: Sequence[str], shape: tuple[int, ...]) -> Chunk:
    """(n, *shape) numbers → a Chunk of the finite rows, the others named with the service's reason.

    The vectorised check (finite, within float32) is what ``validate_instances`` accepts for
    numeric rows; only the rows it flags are handed to the service's validator, for its
    message, so a million good rows never become Python lists.
    """
    if values.shape[1:] != shape:
        raise ValueError(f"rows of shape {values.shape[1:]}, expected {shape}")  # sources reshape first
    flat = values.reshape(len(values), -1)
    if flat.dtype.kind not in "fiu":
        raise FluxoError(f"values of type {flat.dtype} are not numbers; every value must be a number")
    good = _good_rows(flat)
    if good.all():  # the common case: no per-row copy, no second list of ids
        return Chunk(list(ids), np.ascontiguousarray(values, dtype=np.float32), [])
    errors = [(ids[i], _service_problem(values[i], shape)) for i in np.flatnonzero(~good)]
    kept = [ids[i] for i in np.flatnonzero(good)]
    return Chunk(kept, np.ascontiguousarray(values[good], dtype=np.float32), errors)


def _good_rows(flat: np.ndarray) -> np.ndarray:
    """Rows the service accepts: every value finite and within float32's range.

    A float32 row is screened by its sum, one pass with no (rows, values) temporary: NaN and
    ±inf make the sum non-finite, and only rows whose sum is not finite (bad values, or large
    ones that overflowed the sum) get the exact element-wise check.
    """
    if flat.dtype == np.float32:
        with np.errstate(over="ignore", invalid="ignore"):  # an overflowing or inf - inf sum is what is screened
            good = np.isfinite(flat.sum(axis=1, dtype=np.float32))
        suspects = np.flatnonzero(~good)
        if len(suspects):
            good[suspects] = np.isfinite(flat[suspects]).all(axis=1)
        return good
    if flat.dtype.kind == "f":
        return np.isfinite(flat).all(axis=1) & (np.abs(flat) <= _FLOAT32_MAX).all(axis=1)
    return (np.abs(flat.astype(np.float64)) <= _FLOAT32_MAX).all(axis=1)


# --- .npy / .npz ------------------------------------------------------------------------------


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    try:
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(handle)
            return tuple(shape), np.dtype(dtype), fortran, handle.tell()
    except (OSError, ValueError) as error:
        raise FluxoError(f"{path}: not a readable .npy file ({error}); save it with numpy.save") from error


def _check_array_shape(path: Path, shape: tuple[int, ...], contract: Contract, what: str) -> None:
    if tuple(shape[1:]) != contract.input_shape:
        expected = ", ".join(map(str, contract.input_shape))
        raise FluxoError(f"{path}: {what} has shape {tuple(shape)}, the model takes (N, {expected}); "
                         "save the instances as one array of that shape")


def npy_chunks(path: Path, contract: Contract, batch_size: int, digest: Any = None,
               rows: tuple[int, int] | None = None) -> Iterator[Chunk]:
    """A (N, *input_shape) ``.npy`` read ``batch_size`` rows at a time (bounded memory for any N).

    ``digest`` (a hashlib object) is fed every byte as it is read, so the input's hash
    costs no second pass over a file that may be larger than memory. ``rows`` (start, stop)
    reads only that range, ids still counted from the file's first row (one cluster task's share;
    no digest then).
    """
    shape, dtype, fortran, offset = _npy_header(path)
    _check_array_shape(path, shape, contract, "the array")
    if fortran or dtype.hasobject:
        raise FluxoError(f"{path}: a Fortran-ordered or object array cannot be streamed; save a C-ordered numeric array")
    row_items = int(np.prod(shape[1:]))
    first, stop = rows if rows is not None else (0, shape[0])
    stop = min(stop, shape[0])
    with path.open("rb") as handle:
        header = handle.read(offset)
        if digest is not None and rows is None:
            digest.update(header)
        handle.seek(offset + first * row_items * dtype.itemsize)
        for start in range(first, stop, batch_size):
            count = min(batch_size, stop - start)
            data = handle.read(count * row_items * dtype.itemsize)
            if len(data) != count * row_items * dtype.itemsize:
                raise FluxoError(f"{path}: truncated: the header promises {shape[0]} rows, the file ends near row {start}")
            if digest is not None and rows is None:
                digest.update(data)
            values = np.frombuffer(data, dtype=dtype)
            ids = [str(i) for i in range(start, start + count)]
            yield validate_rows(values.reshape(count, *shape[1:]), ids, contract.input_shape)


def npz_chunks(path: Path, contract: Contract, batch_size: int) -> Iterator[Chunk]:
    """An NPZ with ``x`` (N, *input_shape), optional ``ids`` and ``lengths``; loaded whole (zip
    members cannot be sliced).

    ``lengths`` is the training reader's (pipelines/data/sequence_file.py): each sequence's valid
    steps, the rest of its row being padding. A variable-length model gets each row to its own end;
    a fixed-length one refuses the short rows by name.
    """
    arrays = read_npz(path, "instances")
    x = arrays["x"]
    ids = [str(v) for v in arrays["ids"]] if "ids" in arrays else [str(i) for i in range(len(x))]
    lengths = arrays.get("lengths")
    if x.ndim == len(contract.input_shape) and contract.input_shape[0] == 1:
        x = x[:, None]  # (N, L) sequences, as the training reader accepts them
    _check_array_shape(path, x.shape, contract, "'x'")
    if len(ids) != len(x):
        raise FluxoError(f"{path}: 'ids' holds {len(ids)} values for {len(x)} instances; give one id per row of 'x'")
    if lengths is not None:
        lengths = _checked_lengths(path, lengths, len(x), x.shape[-1])
    for start in range(0, len(x), batch_size):
        part, part_ids = x[start:start + batch_size], ids[start:start + batch_size]
        if lengths is None:
            yield validate_rows(part, part_ids, contract.input_shape)
            continue
        steps = lengths[start:start + batch_size]
        part = np.where(np.arange(x.shape[-1]) >= steps[:, None, None], 0, part)  # padding is not read
        yield _sequences_chunk(part, part_ids, steps, contract)


def _checked_lengths(path: Path, lengths: np.ndarray, rows: int, steps: int) -> np.ndarray:
    if lengths.shape != (rows,) or lengths.dtype.kind not in "iu":
        raise FluxoError(f"{path}: 'lengths' has shape {lengths.shape} and type {lengths.dtype}; "
                         f"give one integer per row of 'x' ({rows})")
    bad = np.flatnonzero((lengths < 1) | (lengths > steps))
    if len(bad):
        raise FluxoError(f"{path}: lengths[{bad[0]}] is {lengths[bad[0]]}; a length lies in 1..{steps} "
                         f"({len(bad)} such value(s))")
    return lengths.astype(np.int64)


def _sequences_chunk(values: np.ndarray, ids: Sequence[str], lengths: np.ndarray, contract: Contract,
                     problems: dict[int, str] | None = None) -> Chunk:
    """(n, C, L) zero-padded sequences with their lengths → a Chunk shaped for the model.

    A variable-length model that takes lengths gets NaN past each end, as the service pads
    ragged instances (serving/schemas.validate_sequences); one trained on zero padding gets the
    zeros it was trained on. A fixed-length model refuses the short rows. ``problems``: rows
    (by position) refused before, whatever their values.
    """
    problems = dict(problems or {})
    full = contract.input_shape[-1]
    for row, steps in enumerate(lengths):
        if row in problems:
            continue
        if steps < 1:
            problems[row] = "has no values; give at least one step"
        elif not contract.variable_length and steps < full:
            problems[row] = f"has {steps} values, expected {full} (the model takes fixed-length rows)"
    # Validated by position, so that repeated ids cannot mix up rows and their lengths.
    checked = validate_rows(values, [str(i) for i in range(len(ids))], contract.input_shape)
    kept = np.array([int(i) for i in checked.ids], dtype=np.int64)
    errors = {int(i): why for i, why in checked.errors} | problems
    accepted = np.array([row not in problems for row in kept], dtype=bool)
    kept, batch = kept[accepted], checked.batch[accepted]
    if contract.takes_lengths and len(kept):
        from serving.runtime import nan_padded

        batch = nan_padded(batch, lengths[kept])
    return Chunk([ids[i] for i in kept], batch, [(ids[i], errors[i]) for i in sorted(errors)])


# --- CSV / Parquet ----------------------------------------------------------------------------


def _frame_chunk(frame: Any, start: int, path: Path, contract: Contract) -> Chunk:
    """One pandas frame → a Chunk: wide rows (a column per step, trailing empty cells as padding)
    or, from Parquet, one list column holding each sequence; the label column, if any, is ignored."""
    frame = frame.drop(columns=[c for c in (contract.label_column,) if c in frame.columns])
    ids = frame.pop("id").astype(str).tolist() if "id" in frame.columns else [str(i) for i in range(start, start + len(frame))]
    if _is_list_column(frame):
        return _list_chunk(frame.iloc[:, 0], ids, path, contract)
    width = int(np.prod(contract.input_shape))
    if frame.shape[1] != width:
        raise FluxoError(f"{path}: {frame.shape[1]} value columns, the model takes {width} "
                         f"(input shape {list(contract.input_shape)}); keep the training data's columns")
    frame, not_numbers = _numbers_only(frame, ids)
    rows = frame.to_numpy(dtype=np.float64)
    if contract.variable_length:
        from pipelines.data.sequence_file import (
            _from_rows,  # the training reader's padding, not a copy
        )

        padded, lengths = _from_rows(rows)
        if lengths is None:
            lengths = np.full(len(rows), rows.shape[1], dtype=np.int64)
        return _sequences_chunk(padded.reshape(len(rows), *contract.input_shape), ids, lengths, contract,
                                not_numbers)
    problems = {ids[i]: f"has {n} values, expected {width} (the model takes fixed-length rows)"
                for i, n in _short_rows(rows).items()}
    problems.update({ids[i]: why for i, why in not_numbers.items()})
    chunk = validate_rows(rows.reshape(len(rows), *contract.input_shape), ids, contract.input_shape)
    chunk.errors = [(i, problems.get(i, why)) for i, why in chunk.errors]
    return chunk


def _numbers_only(frame: Any, ids: list[str]) -> tuple[Any, dict[int, str]]:
    """Text cells become empty, each named by row as a problem of that row alone.

    pandas reads a column with one ``abc`` in it as text, so the whole file would be refused
    for one bad cell, while ``n/a`` (read as missing) only costs its row: both are one row's
    problem, and ``--on-error`` decides what happens to that row.
    """
    import pandas as pd

    problems: dict[int, str] = {}
    for column in frame.columns:
        if pd.api.types.is_numeric_dtype(frame[column]):
            continue
        numbers = pd.to_numeric(frame[column], errors="coerce")
        for i in np.flatnonzero(numbers.isna().to_numpy() & frame[column].notna().to_numpy()):
            problems.setdefault(int(i), f"column {column!r} holds {str(frame[column].iloc[i])[:40]!r}, "
                                        "not a number; every step must be a number")
        frame[column] = numbers
    return frame, problems


def _is_list_column(frame: Any) -> bool:
    """One column whose cells are sequences (Parquet's list type), as the training reader takes them."""
    if frame.shape[1] != 1 or frame.iloc[:, 0].dtype != object:
        return False
    first = next((v for v in frame.iloc[:, 0] if v is not None), None)
    return isinstance(first, (list, tuple, np.ndarray))


def _list_chunk(column: Any, ids: list[str], path: Path, contract: Contract) -> Chunk:
    """A list column → zero-padded (n, 1, L) rows and their lengths; a longer sequence is refused by id."""
    if len(contract.input_shape) != 2 or contract.input_shape[0] != 1:
        raise FluxoError(f"{path}: a list column holds one-channel sequences, the model takes input shape "
                         f"{list(contract.input_shape)}; write one column per value instead")
    steps = contract.input_shape[1]
    values = np.zeros((len(ids), 1, steps), dtype=np.float64)
    lengths = np.zeros(len(ids), dtype=np.int64)
    problems: dict[int, str] = {}
    for i, cell in enumerate(column):
        try:
            sequence = np.asarray([] if cell is None else cell, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            problems[i] = "holds values that are not numbers; every step must be a number"
            continue
        if len(sequence) > steps:
            problems[i] = f"has {len(sequence)} values, the model takes at most {steps}"
            continue
        values[i, 0, :len(sequence)], lengths[i] = sequence, len(sequence)
    return _sequences_chunk(values, ids, lengths, contract, problems)


def _short_rows(rows: np.ndarray) -> dict[int, int]:
    """Rows whose trailing cells are empty (a short line in the file): index → values present."""
    present = ~np.isnan(rows)
    lengths = np.where(present.any(1), rows.shape[1] - np.argmax(present[:, ::-1], axis=1), 0)
    return {int(i): int(lengths[i]) for i in np.flatnonzero(lengths < rows.shape[1])}


# --- a table model's CSV / Parquet: columns by name ----------------------------------------------


def csv_chunks(path: Path, contract: Contract, batch_size: int) -> Iterator[Chunk]:
    """A wide CSV (one row per instance) read ``batch_size`` rows at a time with pandas."""
    import pandas as pd

    if contract.table is not None:
        from pipelines.predict.table_source import table_csv_chunks

        yield from table_csv_chunks(path, contract, batch_size)
        return
    start = 0
    try:
        for frame in pd.read_csv(path, chunksize=batch_size):
            yield _frame_chunk(frame, start, path, contract)
            start += len(frame)
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise FluxoError(f"{path}: cannot be read as CSV after row {start} ({error}); "
                         "every line needs the header's number of fields") from error


def parquet_chunks(path: Path, contract: Contract, batch_size: int, row_groups: Sequence[int] | None = None,
                   start: int = 0) -> Iterator[Chunk]:
    """A wide Parquet file read ``batch_size`` rows at a time with pyarrow.

    ``row_groups`` reads only those (one cluster task's share), ``start`` being the file row they begin at."""

    if contract.table is not None:
        from pipelines.predict.table_source import table_parquet_chunks

        yield from table_parquet_chunks(path, contract, batch_size, row_groups, start)
        return
    reader = open_parquet(path)
    for batch in reader.iter_batches(batch_size=batch_size, row_groups=row_groups):
        frame = batch.to_pandas()
        yield _frame_chunk(frame, start, path, contract)
        start += len(frame)


# --- image folders ----------------------------------------------------------------------------


def image_files(folder: Path) -> list[Path]:
    """PNG/JPEG files anywhere below ``folder``, in a stable order (their relative paths are the ids)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_chunks(folder: Path, contract: Contract, batch_size: int, names: Sequence[str] | None = None) -> Iterator[Chunk]:
    """Files decoded one by one with the service's upload path (serving.images.decode_image).

    ``names`` (paths relative to ``folder``) reads only those: one cluster task's share."""
    from serving.images import InvalidImage, decode_image

    if contract.image is None:
        raise FluxoError(f"{folder}: an image folder, but the model takes no images (input shape "
                         f"{list(contract.input_shape)}); pass a .npy, NPZ, CSV or Parquet file")
    files = image_files(folder) if names is None else [folder / name for name in names]
    if not files:
        raise FluxoError(f"{folder}: no PNG or JPEG file below it (nor any .npy or Parquet part); {_READS}")
    for start in range(0, len(files), batch_size):
        ids, arrays, errors = [], [], []
        for file in files[start:start + batch_size]:
            name = file.relative_to(folder).as_posix()
            try:
                arrays.append(decode_image(file.read_bytes(), contract.image, name))
                ids.append(name)
            except InvalidImage as error:
                errors.append((name, str(error).removeprefix(f"{name}: ")))
            except OSError as error:
                errors.append((name, f"cannot be read ({error.strerror or error})"))
        batch = np.stack(arrays) if arrays else np.zeros((0, *contract.input_shape), dtype=np.float32)
        yield Chunk(ids, batch, errors)


# --- folders of parts ---------------------------------------------------------------------------


def folder_files(folder: Path) -> tuple[str, list[Path]]:
    """What a folder holds, anywhere below it, in a stable order: ``("images", PNG/JPEG files)`` or
    ``("parts", .npy and Parquet files)``, whose relative paths name their rows; both kinds at once is refused."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | PART_SUFFIXES)
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]  # one listing: folders can hold 100,000s
    parts = [p for p in files if p.suffix.lower() in PART_SUFFIXES]
    if images and parts:
        raise FluxoError(f"{folder}: holds both images ({len(images)}, e.g. {images[0].relative_to(folder)}) and "
                         f".npy/Parquet parts ({len(parts)}, e.g. {parts[0].relative_to(folder)}); "
                         "give a folder of one kind")
    return ("parts", parts) if parts else ("images", images)


def relative_name(folder: Path, file: Path) -> str:
    """A file's path below ``folder``, with ``/``: an image's id, a part's name in its rows' ids."""
    return file.relative_to(folder).as_posix()


def named_rows(chunks: Iterator[Chunk], name: str) -> Iterator[Chunk]:
    """``chunks`` of one part with each id (and each refused row's id) as ``name:id``: unique across the folder."""
    for chunk in chunks:
        chunk.ids = [f"{name}:{row}" for row in chunk.ids]
        chunk.errors = [(f"{name}:{row}", why) for row, why in chunk.errors]
        yield chunk


def parts_chunks(folder: Path, parts: Sequence[Path], contract: Contract, batch_size: int) -> Iterator[Chunk]:
    """A folder of parts, each part by its own reader."""
    for part in parts:
        read = npy_chunks if part.suffix.lower() == ".npy" else parquet_chunks
        yield from named_rows(read(part, contract, batch_size), relative_name(folder, part))


# --- dispatch ---------------------------------------------------------------------------------


_READERS = {".npy": npy_chunks, ".npz": npz_chunks, ".csv": csv_chunks, ".parquet": parquet_chunks,
            ".pq": parquet_chunks}
_READS = "pass a .npy, .npz, .csv or .parquet file, or a folder of images or of .npy/.parquet parts"


def check_input(path: Path) -> None:
    """Refuse a path no reader takes, by name, before a model is fetched or a store opened for it."""
    path = Path(path)
    if path.is_dir():
        return
    if not path.is_file():
        raise FluxoError(f"{path}: no such file or folder; {_READS}")
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise FluxoError(f"{path}: {suffix or 'no suffix'} is not an input fluxo reads; {_READS}")


def chunks(path: Path, contract: Contract, batch_size: int, digest: Any = None) -> Iterator[Chunk]:
    """The reader for ``path`` by its kind: a folder of images, or a file by its suffix.

    Readers that see the bytes in file order (``.npy``) feed ``digest`` as they go; for the
    others the caller hashes with :func:`input_sha256` (``hashes_while_reading`` says which).
    """
    path = Path(path)
    check_input(path)
    if path.is_dir():
        kind, files = folder_files(path)
        if kind == "parts":
            return parts_chunks(path, files, contract, batch_size)
        return image_chunks(path, contract, batch_size, names=[relative_name(path, file) for file in files] or None)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return npy_chunks(path, contract, batch_size, digest)
    return _READERS[suffix](path, contract, batch_size)


def hashes_while_reading(path: Path) -> bool:
    """True when :func:`chunks` feeds its ``digest`` with the whole file (a single streamed pass)."""
    return Path(path).is_file() and Path(path).suffix.lower() == ".npy"


def count_instances(path: Path) -> int | None:
    """How many instances ``path`` holds, when that is cheap to know (for the progress bar); else None."""
    path = Path(path)
    try:
        if path.is_dir():
            kind, files = folder_files(path)
            return len(files) if kind == "images" else sum(_rows_of(part) for part in files)
        if path.suffix.lower() in PART_SUFFIXES:
            return _rows_of(path)
    except (FluxoError, OSError, ValueError):
        return None
    return None


def _rows_of(part: Path) -> int:
    """The rows of one ``.npy`` or Parquet file, from its header or footer."""
    if part.suffix.lower() == ".npy":
        return _npy_header(part)[0][0]
    import pyarrow.parquet as pq

    return pq.ParquetFile(part).metadata.num_rows


def input_sha256(path: Path, block: int = 1 << 20) -> str:
    """SHA-256 of the input, streamed; for a folder, of each file's relative path and bytes in order."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [(relative_name(path, p), p) for p in folder_files(path)[1]] if path.is_dir() else [(None, path)]
    for name, file in files:
        if name is not None:
            digest.update(name.encode() + b"\0")
        with file.open("rb") as handle:
            while data := handle.read(block):
                digest.update(data)
    return digest.hexdigest()
