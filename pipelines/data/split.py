"""Stratified train/val/test split with a fixed seed."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from pipelines.data.sources import RawDataset

SPLITS = ("train", "val", "test")


def stratified_split(
    raw: RawDataset, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Index arrays per split, each stratified by class.

    The fractions are of the whole dataset. A source's own test set, when it has
    one, is kept as the test split, so results stay comparable with the literature.
    """
    indices = np.arange(len(raw.y))
    if raw.fixed_test is not None:
        test = indices[raw.fixed_test]
        rest = indices[~raw.fixed_test]
        val_share = val_fraction / (1 - test_fraction)
    else:
        rest, test = train_test_split(indices, test_size=test_fraction, stratify=raw.y, random_state=seed)
        val_share = val_fraction / (1 - test_fraction)
    train, val = train_test_split(rest, test_size=val_share, stratify=raw.y[rest], random_state=seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
