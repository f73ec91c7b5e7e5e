"""A source's samples before validation: what every reader (built-in, image folder, sequence file) returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Problem:
    """One kind of problem found at ingest, with the samples (files or rows) it concerns."""

    check: str
    message: str
    items: list[str] = field(default_factory=list)


@dataclass
class RawDataset:
    """Samples as the model sees one instance (channels first), before validation and splitting.

    ``x`` may be a memory map (image folders larger than RAM). ``fixed_test`` marks
    samples the source itself reserves for testing (mnist1d ships a train/test
    split). ``ids`` name each sample (file path or row) for messages.
    """

    name: str
    kind: str  # "image" or "sequence"
    x: np.ndarray  # (N, *input_shape)
    y: np.ndarray  # int64 class indices, or float32 regression targets
    labels: list[str]  # class names; ["target"] for regression
    task: str = "classification"  # or "regression"
    lengths: np.ndarray | None = None  # valid steps per sequence when lengths vary
    fixed_test: np.ndarray | None = None  # bool mask, (N,)
    ids: list[str] | None = None
    description: str = ""
    preprocessing: dict[str, Any] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)  # found while reading (corrupt files, ...)
    readable: np.ndarray | None = None  # bool mask: False where a file could not be decoded

    def sample_id(self, index: int) -> str:
        return self.ids[index] if self.ids is not None else f"sample {index}"
