"""What an input reader for ``fluxo predict`` hands on (:class:`Chunk`) and what it must know about the
model (:class:`Contract`, :func:`contract_for`): shared by the readers in pipelines/predict/sources.py and
table_source.py, in one process or on a cluster's actors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Chunk:
    """Up to ``batch_size`` instances: the valid ones as one float32 batch, the bad ones with their reason."""

    ids: list[str]
    batch: np.ndarray
    errors: list[tuple[str, str]] = field(default_factory=list)
    unseen: dict[str, int] = field(default_factory=dict)  # a table's unseen category values per column


@dataclass(frozen=True)
class Contract:
    """What a source must know about the model to shape instances: shape, padding, image recipe, label column."""

    input_shape: tuple[int, ...]
    variable_length: bool = False
    takes_lengths: bool = False  # the graph reads each sequence to its own end: padding goes in as NaN
    image: Any = None  # serving.images.ImageSpec or None
    label_column: str = "label"
    table: Any = None  # serving.table_rows.TableRows of a table model, or None


@dataclass
class Unseen:
    """Category values training never saw, per column, over a whole input (encoded as no category)."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, counts: dict[str, int]) -> None:
        for column, count in counts.items():
            self.counts[column] = self.counts.get(column, 0) + count


@dataclass
class Tally:
    """What a prediction loop counts over a whole input: rows answered, bad rows skipped (the first ``limit``
    kept with their reason, for the errors file) and unseen category values; in one process or per share."""

    limit: int
    rows: int = 0
    skipped: int = 0
    kept: list[tuple[str, str]] = field(default_factory=list)
    unseen: Unseen = field(default_factory=Unseen)

    def skip(self, errors: list[tuple[str, str]], unseen: dict[str, int], count: int | None = None) -> None:
        """``errors`` skipped (``count`` of them when only some are listed) and ``unseen`` categories met."""
        self.skipped += len(errors) if count is None else count
        self.unseen.add(unseen)
        self.kept.extend(errors[: max(0, self.limit - len(self.kept))])


def contract_for(model: Any, label_column: str) -> Contract:
    """What the readers must know about a loaded model (``label_column``: data.sequence.label_column)."""
    from serving.images import image_spec

    return Contract(
        input_shape=tuple(model.input_shape),
        variable_length=bool(model.metadata.get("variable_length")),
        takes_lengths=bool(getattr(model, "takes_lengths", False)),
        image=image_spec(model.metadata),
        label_column=label_column,
        table=getattr(model, "table_rows", None),
    )


def open_parquet(path: Any) -> Any:
    """``pyarrow.parquet.ParquetFile`` for ``path``, or a FluxoError naming it (every Parquet reader's opening)."""
    import pyarrow.parquet as pq

    from pipelines.errors import FluxoError

    try:
        return pq.ParquetFile(path)
    except Exception as error:
        raise FluxoError(f"{path}: not a readable Parquet file ({error})") from error
