"""Stratified train/val/test split with a fixed seed, or k folds of train+val."""

from __future__ import annotations

import numpy as np

from pipelines.errors import FluxoError

SPLITS = ("train", "val", "test")


def _stratify(y: np.ndarray, task: str) -> np.ndarray | None:
    return y if task == "classification" else None


def stratified_split(
    y: np.ndarray,
    candidates: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    *,
    task: str = "classification",
    fixed_test: np.ndarray | None = None,
    folds: int | None = None,
    fold: int = 0,
) -> dict[str, np.ndarray]:
    """Index arrays per split over ``candidates`` (the samples that passed validation).

    The fractions are of the whole dataset. A source's own test set (``fixed_test``)
    is kept as the test split, so results stay comparable with the literature.
    With ``folds``, val is fold ``fold`` of the non-test samples.
    """
    # Imported here: every reader of a dataset imports this module for SPLITS, and scikit-learn
    # costs a second of start-up that `fluxo status` and `serve` never use.
    from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

    candidates = np.asarray(candidates)
    try:
        if fixed_test is not None:
            test = candidates[fixed_test[candidates]]
            rest = candidates[~fixed_test[candidates]]
        else:
            rest, test = train_test_split(
                candidates, test_size=test_fraction, stratify=_stratify(y[candidates], task), random_state=seed
            )
        if folds is not None:
            splitter = StratifiedKFold if task == "classification" else KFold
            parts = list(splitter(n_splits=folds, shuffle=True, random_state=seed).split(rest, y[rest]))
            train_pos, val_pos = parts[fold]
            train, val = rest[train_pos], rest[val_pos]
        else:
            train, val = train_test_split(
                rest,
                test_size=val_fraction / (1 - test_fraction),
                stratify=_stratify(y[rest], task),
                random_state=seed,
            )
    except ValueError as error:
        counts = np.bincount(y[candidates]) if task == "classification" else []
        smallest = int(np.argmin(np.where(counts > 0, counts, np.iinfo(np.int64).max))) if len(counts) else None
        hint = f" (class index {smallest} has {counts[smallest]} samples)" if smallest is not None else ""
        many = task == "classification" and len(counts) > 20
        regression = (f", or, if the {len(counts)} classes are values of a quantity, set "
                      "data.sequence.target=regression") if many else ""
        raise FluxoError(
            f"cannot split {len(candidates)} samples into train/val/test{hint}: {error}; add samples to small "
            f"classes or lower data.val_fraction/data.test_fraction{regression}"
        ) from error
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
