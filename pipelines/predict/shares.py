"""An input cut into shares that cluster tasks read on their own: row ranges of a ``.npy``, row groups
of a Parquet file, runs of an image folder's files; a folder of parts, each part's.

Each share is read by the very readers of the one-process path (pipelines/predict/sources.py) with
its range, so ids, validation and encoding are theirs, and the shares' answers in order are the
one-process answers. A CSV or NPZ file cannot be cut without reading it (text lines; a compressed
zip member): it is one share, which a cluster runs on one worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from pipelines.predict.chunk import Chunk, Contract, open_parquet
from pipelines.predict.sources import _check_array_shape, _npy_header, chunks, folder_files, relative_name

ShareKind = Literal["npy", "parquet", "images", "whole"]


@dataclass(frozen=True)
class Share:
    """One task's part of the input: what to read, and where its rows start in the whole."""

    path: str
    kind: ShareKind
    start: int = 0
    stop: int = 0
    row_groups: tuple[int, ...] = ()
    names: tuple[str, ...] = field(default=())
    part: str = ""  # a folder of parts: this part's relative path, which names its rows

    def read(self, contract: Contract, batch_size: int) -> Iterator[Chunk]:
        """This share's chunks, by the one-process readers."""
        from pipelines.predict.sources import image_chunks, named_rows, npy_chunks, parquet_chunks

        path = Path(self.path)
        if self.kind == "npy":
            read = npy_chunks(path, contract, batch_size, rows=(self.start, self.stop))
        elif self.kind == "parquet":
            read = parquet_chunks(path, contract, batch_size, row_groups=list(self.row_groups), start=self.start)
        elif self.kind == "images":
            return image_chunks(path, contract, batch_size, names=self.names)
        else:
            return chunks(path, contract, batch_size)
        return named_rows(read, self.part) if self.part else read


def plan_shares(path: Path, contract: Contract, rows_per_share: int) -> list[Share]:
    """``path`` cut into shares of about ``rows_per_share`` instances, in the input's order.

    What the one-process path would refuse before reading any row (a wrong shape, an empty folder)
    is refused here, before a task is sent. A folder of parts is each part's shares in turn (a share
    never spans two parts)."""
    path = Path(path)
    if path.is_dir():
        kind, files = folder_files(path)
        if kind == "parts":
            return [replace(share, part=relative_name(path, part))
                    for part in files for share in _file_shares(part, contract, rows_per_share)]
        if not files:
            return [Share(str(path), "whole")]  # the reader's own error, raised where it runs
        names = [relative_name(path, file) for file in files]
        return [Share(str(path), "images", start, start + len(part), names=tuple(part))
                for start in range(0, len(names), rows_per_share)
                for part in [names[start:start + rows_per_share]]]
    return _file_shares(path, contract, rows_per_share)


def _file_shares(path: Path, contract: Contract, rows_per_share: int) -> list[Share]:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        shape = _npy_header(path)[0]
        _check_array_shape(path, shape, contract, "the array")
        return [Share(str(path), "npy", start, min(start + rows_per_share, shape[0]))
                for start in range(0, shape[0], rows_per_share)] or [Share(str(path), "npy", 0, 0)]
    if suffix in (".parquet", ".pq"):
        return _parquet_shares(path, rows_per_share)
    return [Share(str(path), "whole")]


def _parquet_shares(path: Path, rows_per_share: int) -> list[Share]:
    """Consecutive row groups gathered until a share holds ``rows_per_share`` rows (a row group is never split)."""
    metadata = open_parquet(path).metadata
    shares, groups, start, rows = [], [], 0, 0
    for index in range(metadata.num_row_groups):
        groups.append(index)
        rows += metadata.row_group(index).num_rows
        if rows >= rows_per_share:
            shares.append(Share(str(path), "parquet", start, start + rows, row_groups=tuple(groups)))
            groups, start, rows = [], start + rows, 0
    if groups or not shares:
        shares.append(Share(str(path), "parquet", start, start + rows, row_groups=tuple(groups)))
    return shares
