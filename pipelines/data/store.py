"""The on-disk dataset layout under ``data/``, written atomically and read back validated.

Layout (plain ``.npy`` files: ``np.savez`` stamps zip entries with the current
time, which would change the DVC md5 of identical data; ``.npy`` also memory-maps)::

    data/dataset.json                  name, kind, task, shapes, dtype, labels, split, shards
    data/validation.json               what ingest checked and what it found
    data/{train,val,test}/x-00000.npy  samples in shards of at most ``shard_size``
    data/{train,val,test}/y.npy        targets (int64 classes or float32 regression values)
    data/{train,val,test}/lengths.npy  valid length per sequence, for variable-length data

Shards are read through memory maps, so a dataset larger than RAM streams from disk.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipelines.data.raw import RawDataset
from pipelines.data.split import SPLITS
from pipelines.errors import FluxoError

log = logging.getLogger(__name__)

MANIFEST = "dataset.json"
VALIDATION = "validation.json"
DEFAULT_SHARD_SIZE = 65_536
_COPY_CHUNK = 16_384  # samples gathered per step when copying from a memory-mapped source


@dataclass
class Split:
    """One split: shards of x (memory-mapped), y and optional lengths in memory."""

    shards: list[np.ndarray]
    y: np.ndarray
    lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.y)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def x(self) -> np.ndarray:
        """All samples as one array in memory; for small data (streaming uses ``shards``)."""
        if len(self.shards) == 1:
            return np.asarray(self.shards[0])
        return np.concatenate(self.shards) if self.shards else np.zeros((0,), dtype=np.float32)


@dataclass
class Dataset:
    """A versioned dataset as training sees it."""

    manifest: dict[str, Any]
    splits: dict[str, Split]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["input_shape"])

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def task(self) -> str:
        return str(self.manifest.get("task", "classification"))


def write_dataset(
    raw: RawDataset,
    split_indices: dict[str, np.ndarray],
    data_dir: Path,
    split_info: dict[str, Any],
    validation: dict[str, Any] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    after_swap: Callable[[Path], None] | None = None,
) -> Path:
    """Write into a temporary sibling directory and swap it in only when complete.

    ``after_swap`` runs with the new data in place (e.g. ``dvc add``); if it fails,
    the previous ``data_dir`` is put back. Either way, a failed or interrupted
    ingest leaves the previous dataset exactly as it was.
    """
    data_dir = Path(data_dir)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.ingest-", dir=data_dir.parent))
    try:
        shard_counts = {}
        for split in SPLITS:
            idx = np.asarray(split_indices[split], dtype=np.int64)
            shard_counts[split] = _write_split(raw, idx, staging / split, shard_size)
        manifest = {
            "name": raw.name,
            "kind": raw.kind,
            "task": raw.task,
            "description": raw.description,
            "input_shape": list(raw.x.shape[1:]),
            "dtype": str(raw.x.dtype),
            "labels": raw.labels,
            "variable_length": raw.lengths is not None,
            "preprocessing": raw.preprocessing,
            "split": {**split_info, "sizes": {s: int(len(split_indices[s])) for s in SPLITS}},
            "shards": shard_counts,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if validation is not None:
            (staging / VALIDATION).write_text(json.dumps(validation, indent=2, sort_keys=True) + "\n")
        _swap_in(staging, data_dir, after_swap)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote %s (%s)", data_dir, manifest["split"]["sizes"])
    return data_dir


def _write_split(raw: RawDataset, idx: np.ndarray, directory: Path, shard_size: int) -> int:
    """Gather ``raw[idx]`` into shards chunk by chunk, so a memory-mapped source is never loaded whole."""
    directory.mkdir()
    shards = max(1, -(-len(idx) // shard_size))
    for number in range(shards):
        part = idx[number * shard_size : (number + 1) * shard_size]
        out = np.lib.format.open_memmap(
            directory / f"x-{number:05d}.npy", mode="w+", dtype=raw.x.dtype, shape=(len(part), *raw.x.shape[1:])
        )
        for start in range(0, len(part), _COPY_CHUNK):
            chunk = part[start : start + _COPY_CHUNK]
            out[start : start + len(chunk)] = raw.x[chunk]
        out.flush()
        del out
    np.save(directory / "y.npy", np.ascontiguousarray(raw.y[idx]))
    if raw.lengths is not None:
        np.save(directory / "lengths.npy", np.ascontiguousarray(raw.lengths[idx], dtype=np.int64))
    return shards


def _swap_in(staging: Path, data_dir: Path, after_swap: Callable[[Path], None] | None) -> None:
    """Replace ``data_dir`` by ``staging`` with renames; restore the old one if ``after_swap`` fails."""
    retired = data_dir.with_name(f".{data_dir.name}.retired-{os.getpid()}")
    shutil.rmtree(retired, ignore_errors=True)
    had_previous = data_dir.exists()
    if had_previous:
        os.replace(data_dir, retired)
    try:
        os.replace(staging, data_dir)
        if after_swap is not None:
            after_swap(data_dir)
    except BaseException:
        if data_dir.exists():
            os.replace(data_dir, staging)  # the caller's cleanup removes it
        if had_previous:
            os.replace(retired, data_dir)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def read_dataset(data_dir: Path, mmap: bool = True) -> Dataset:
    """Open a dataset written by :func:`write_dataset`, checking that it is complete."""
    data_dir = Path(data_dir)
    manifest_path = data_dir / MANIFEST
    if not manifest_path.is_file():
        raise FluxoError(f"{manifest_path}: missing; run `fluxo data ingest` (or `dvc pull`) first")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise FluxoError(f"{manifest_path}: not valid JSON ({error}); re-run `fluxo data ingest`") from error
    splits = {}
    for split in SPLITS:
        directory = data_dir / split
        try:
            count = int(manifest.get("shards", {}).get(split, 1))
            shards = [np.load(directory / f"x-{n:05d}.npy", mmap_mode="r" if mmap else None) for n in range(count)]
            y = np.load(directory / "y.npy")
            lengths = np.load(directory / "lengths.npy") if (directory / "lengths.npy").exists() else None
        except (OSError, ValueError, KeyError) as error:
            raise FluxoError(f"{directory}: unreadable ({error}); re-run `fluxo data ingest`") from error
        if any(s.shape[1:] != tuple(manifest["input_shape"]) for s in shards) or sum(len(s) for s in shards) != len(y):
            raise FluxoError(
                f"{directory}: shards do not match input_shape {manifest['input_shape']} and {len(y)} targets "
                f"in {manifest_path}; re-run `fluxo data ingest`"
            )
        splits[split] = Split(shards, y, lengths)
    return Dataset(manifest, splits)


def read_validation(data_dir: Path) -> dict[str, Any] | None:
    path = Path(data_dir) / VALIDATION
    return json.loads(path.read_text()) if path.is_file() else None
