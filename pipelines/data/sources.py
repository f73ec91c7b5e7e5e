"""Built-in datasets, generated or loaded offline from packages that ship them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipelines.errors import FluxoError

log = logging.getLogger(__name__)


@dataclass
class RawDataset:
    """Samples as the model sees one instance (channels first), before splitting.

    ``fixed_test`` marks samples the source itself reserves for testing (mnist1d
    ships a train/test split); ``None`` lets the splitter choose.
    """

    name: str
    kind: str  # "image" or "sequence"
    x: np.ndarray  # float32, (N, *input_shape)
    y: np.ndarray  # int64 class indices, (N,)
    labels: list[str]
    fixed_test: np.ndarray | None = None  # bool mask, (N,)
    description: str = ""


def load_digits() -> RawDataset:
    """scikit-learn's 1,797 8×8 handwritten digits, pixel values 0–16, as (1, 8, 8) images."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = bunch.images.astype(np.float32)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    return RawDataset(
        "digits", "image", x, y, [str(c) for c in bunch.target_names], description="scikit-learn digits, 8x8"
    )


def load_mnist1d() -> RawDataset:
    """The MNIST-1D generator with its default arguments: 4,000 train + 1,000 test sequences of length 40."""
    from mnist1d.data import get_dataset_args, make_dataset

    generated = make_dataset(get_dataset_args())
    x = np.concatenate([generated["x"], generated["x_test"]]).astype(np.float32)[:, None, :]
    y = np.concatenate([generated["y"], generated["y_test"]]).astype(np.int64)
    fixed_test = np.zeros(len(y), dtype=bool)
    fixed_test[len(generated["y"]) :] = True
    return RawDataset(
        "mnist1d",
        "sequence",
        x,
        y,
        [str(c) for c in range(10)],
        fixed_test=fixed_test,
        description="MNIST-1D generator, default arguments (seed 42), length 40",
    )


BUILTIN_SOURCES: dict[str, Callable[[], RawDataset]] = {"digits": load_digits, "mnist1d": load_mnist1d}


def load_builtin(name: str) -> RawDataset:
    """Load a built-in dataset by name; nothing is downloaded."""
    if name not in BUILTIN_SOURCES:
        raise FluxoError(
            f"dataset {name!r} is not built in; choose one of {', '.join(sorted(BUILTIN_SOURCES))} "
            "(set data.dataset in the preset or --set data.dataset=NAME)"
        )
    raw = BUILTIN_SOURCES[name]()
    log.info("loaded %s: %d samples shaped %s", name, len(raw.y), raw.x.shape[1:])
    return raw
