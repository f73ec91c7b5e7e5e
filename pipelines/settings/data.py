"""Where a dataset comes from and how it is read: image folders, tables and sequence files, the checks
ingest runs, and the split. A section of :class:`pipelines.settings.FluxoSettings` (``data.*``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """A settings section: a key it does not have is an error, never ignored."""

    model_config = ConfigDict(extra="forbid")


class ImageSettings(Section):
    """How an image folder becomes fixed-size tensors; recorded with the data version."""

    size: tuple[int, int] = Field((28, 28), description="(height, width) every image is brought to.")
    channels: Literal["auto", 1, 3] = Field("auto", description="auto: 1 if every image is grayscale, else 3 (RGB).")
    resize: Literal["resize", "pad", "crop"] = Field(
        "resize",
        description="resize: stretch to size; pad: keep aspect, pad with black; crop: keep aspect, centre crop.",
    )


class SequenceSettings(Section):
    """How a CSV, NPZ or Parquet file becomes a table or sequences, and targets."""

    # An integer-valued target is a class label only when it has few distinct values for its rows:
    # at most MAX_CLASSES, or at most the square root of the row count (10 digits in 4,000 rows are
    # classes; 214 values in 442 rows, the diabetes progression score, are a quantity).
    MAX_CLASSES: ClassVar[int] = 20

    label_column: str = Field("label", description="Column (CSV/Parquet) or array (NPZ) holding the targets.")
    target: Literal["auto", "classification", "regression"] = Field(
        "auto",
        description="auto: text targets are classes; integer targets are classes when they take at most "
        f"{MAX_CLASSES} distinct values or at most sqrt(rows), else regression; other numbers regression.",
    )
    kind: Literal["auto", "table", "sequence"] = Field(
        "auto",
        description="How a CSV/Parquet file's columns are read. table: named features (scaled one by one, text "
        "columns one-hot encoded, missing values handled by data.sequence.missing), raced only with table models; "
        "sequence: one column per step. auto: a sequence when model.name is a sequence model, the file has ragged "
        "rows or a list column, or its columns are numbered steps (t0, t1, ... or 0, 1, ...); otherwise a table.",
    )
    missing: Literal["refuse", "impute"] = Field(
        "impute",
        description="Empty cells of a table: impute (the training split's median, plus a 0/1 missing-indicator "
        "feature for each column that had any; both inside the exported graph, so a served null is imputed the "
        "same way) or refuse (ingest fails naming the columns; the service refuses nulls).",
    )
    max_categories: int = Field(
        20, ge=2, description="A table's text column with at most this many distinct values is one-hot encoded; "
        "one with more is refused, naming the column and its count.",
    )
    unseen_category: Literal["ignore", "refuse"] = Field(
        "ignore", description="A value of a text column that training never saw, at serving time: ignore (counted "
        "in fluxo_unseen_categories_total and encoded as no category) or refuse (a 400 naming the column).",
    )
    scaling: Literal["standard", "robust"] = Field(
        "standard", description="Per-column scaling of a table inside the graph, fitted on the training split: "
        "standard (mean, standard deviation) or robust (median, interquartile range; for heavy tails).",
    )


class ValidationSettings(Section):
    """What ingest does about each kind of problem: fail (name the files and the fix) or skip and report."""

    corrupt: Literal["fail", "skip"] = Field("skip", description="Unreadable files and files that are not images.")
    empty_class: Literal["fail", "skip"] = Field("fail", description="A class folder with no usable image.")
    non_finite: Literal["fail", "skip"] = Field("fail", description="Samples containing NaN or Inf.")
    duplicates: Literal["fail", "skip", "keep"] = Field(
        "skip", description="Identical samples (by content hash): skip keeps the first copy."
    )
    leakage: Literal["fail", "report"] = Field(
        "fail", description="The same sample in two splits (possible only with duplicates=keep)."
    )
    max_imbalance: float | None = Field(
        None, gt=1, description="Fail when the largest class outnumbers the smallest by more than this."
    )


class DataSettings(Section):
    """Where the dataset comes from, where it lives and how it is split."""

    dataset: str = Field(
        "digits", description="Built-in name (digits, mnist, mnist1d), an image folder, or a .csv/.npz/.parquet file."
    )
    image: ImageSettings = Field(default_factory=ImageSettings)
    sequence: SequenceSettings = Field(default_factory=SequenceSettings)
    validation: ValidationSettings = Field(default_factory=ValidationSettings)
    folds: int | None = Field(None, ge=2, description="k for k-fold: val is fold `fold` of train+val; test stays.")
    fold: int = Field(0, ge=0, description="Which of the k folds is the validation split.")
    shard_size: int = Field(65_536, ge=1, description="Samples per .npy shard; shards are memory-mapped.")
    data_dir: Path = Field(Path("data"), description="DVC-tracked dataset directory, relative to the project root.")
    dvc_remote: str = Field(
        str(Path.home() / ".cache" / "fluxo" / "dvc-remote"),
        description="DVC remote URL or local path; outside the repo so clones never carry data.",
    )
    dvc_remote_endpoint_url: str | None = Field(None, description="S3 endpoint for an S3-compatible DVC remote.")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="Share of all samples held out for validation.")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Share of all samples held out for testing.")
    split_seed: int = Field(0, description="Seed of the stratified split; part of the data version.")
    push: bool = Field(True, description="Push the data to the DVC remote after versioning.")
