"""The on-disk dataset layout under ``data/``, written atomically and read back validated.

Layout (plain ``.npy`` files because ``np.savez`` stamps zip entries with the
current time, which would change the DVC md5 of identical data)::

    data/dataset.json          name, kind, input shape, labels, split sizes and seed
    data/{train,val,test}/x.npy, y.npy
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.data.sources import RawDataset
from pipelines.data.split import SPLITS
from pipelines.errors import FluxoError

log = logging.getLogger(__name__)

MANIFEST = "dataset.json"


@dataclass
class Split:
    x: np.ndarray
    y: np.ndarray


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


def validate_raw(raw: RawDataset) -> None:
    """Refuse data that would train silently wrong: NaN/Inf, shape mismatch, fewer than two classes."""
    if raw.x.ndim < 2 or len(raw.x) != len(raw.y):
        raise FluxoError(f"dataset {raw.name}: {len(raw.x)} samples but {len(raw.y)} labels")
    bad = ~np.isfinite(raw.x.reshape(len(raw.x), -1)).all(axis=1)
    if bad.any():
        raise FluxoError(
            f"dataset {raw.name}: {int(bad.sum())} samples contain NaN or Inf "
            f"(first at index {int(np.flatnonzero(bad)[0])}); clean or drop them before ingest"
        )
    classes = np.unique(raw.y)
    if len(classes) < 2:
        raise FluxoError(f"dataset {raw.name}: only one class ({classes.tolist()}); classification needs two or more")
    if raw.y.min() < 0 or raw.y.max() >= len(raw.labels):
        raise FluxoError(f"dataset {raw.name}: labels must be 0..{len(raw.labels) - 1}, found {classes.tolist()}")


def write_dataset(
    raw: RawDataset, split_indices: dict[str, np.ndarray], data_dir: Path, split_info: dict[str, Any]
) -> Path:
    """Write into a temporary sibling directory and swap it in only when complete.

    An interrupted or failed write leaves the previous ``data_dir`` exactly as it was.
    """
    validate_raw(raw)
    data_dir = Path(data_dir)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.ingest-", dir=data_dir.parent))
    try:
        for split in SPLITS:
            idx = split_indices[split]
            (staging / split).mkdir()
            np.save(staging / split / "x.npy", np.ascontiguousarray(raw.x[idx], dtype=np.float32))
            np.save(staging / split / "y.npy", np.ascontiguousarray(raw.y[idx], dtype=np.int64))
        manifest = {
            "name": raw.name,
            "kind": raw.kind,
            "description": raw.description,
            "input_shape": list(raw.x.shape[1:]),
            "labels": raw.labels,
            "split": {**split_info, "sizes": {s: int(len(split_indices[s])) for s in SPLITS}},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _swap_in(staging, data_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote %s (%s)", data_dir, manifest["split"]["sizes"])
    return data_dir


def _swap_in(staging: Path, data_dir: Path) -> None:
    """Replace ``data_dir`` by ``staging`` with renames, so readers never see a half-written dataset."""
    if not data_dir.exists():
        os.replace(staging, data_dir)
        return
    retired = data_dir.with_name(f".{data_dir.name}.retired-{os.getpid()}")
    shutil.rmtree(retired, ignore_errors=True)
    os.replace(data_dir, retired)
    try:
        os.replace(staging, data_dir)
    except BaseException:
        os.replace(retired, data_dir)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def read_dataset(data_dir: Path) -> Dataset:
    """Load a dataset written by :func:`write_dataset`, checking that it is complete."""
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
        try:
            x = np.load(data_dir / split / "x.npy")
            y = np.load(data_dir / split / "y.npy")
        except (OSError, ValueError) as error:
            raise FluxoError(f"{data_dir / split}: unreadable ({error}); re-run `fluxo data ingest`") from error
        if x.shape[1:] != tuple(manifest["input_shape"]) or len(x) != len(y):
            raise FluxoError(
                f"{data_dir / split}: x{x.shape} / y{y.shape} do not match input_shape "
                f"{manifest['input_shape']} in {manifest_path}; re-run `fluxo data ingest`"
            )
        splits[split] = Split(x, y)
    return Dataset(manifest, splits)
