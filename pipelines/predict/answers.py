"""The predictions file's rows, as ``fluxo predict`` writes them in one process or from a cluster's actors.

Columns: ``id``, then a classifier's ``label``, ``probability`` (of that label) and
``probabilities`` (over all labels, in metadata order), or a regression model's ``value`` (in
the target's units, as ``POST /predict`` answers it), then ``model_version``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.predict.chunk import Chunk, Tally


def answers_schema(regression: bool = False) -> Any:
    import pyarrow as pa

    if regression:
        return pa.schema([("id", pa.string()), ("value", pa.float32()), ("model_version", pa.string())])
    return pa.schema([
        ("id", pa.string()),
        ("label", pa.string()),
        ("probability", pa.float32()),
        ("probabilities", pa.list_(pa.float32())),
        ("model_version", pa.string()),
    ])


def answers_table(ids: list[str], probabilities: np.ndarray, labels: list[str], version: str | None,
                  regression: bool = False) -> Any:
    """One chunk's rows as an Arrow table; probabilities as one list column without Python floats.

    ``regression``: ``probabilities`` are the model's (n, 1) values, written as the ``value`` column."""
    import pyarrow as pa

    n, k = probabilities.shape
    if regression:
        return pa.table({
            "id": pa.array(ids, pa.string()),
            "value": pa.array(np.ascontiguousarray(probabilities[:, 0], dtype=np.float32)),
            "model_version": pa.array([version] * n, pa.string()),
        }, schema=answers_schema(True))
    best = probabilities.argmax(axis=1)
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
    values = pa.array(np.ascontiguousarray(probabilities, dtype=np.float32).ravel())
    return pa.table({
        "id": pa.array(ids, pa.string()),
        "label": pa.array([labels[i] for i in best], pa.string()),
        "probability": pa.array(probabilities[np.arange(n), best].astype(np.float32)),
        "probabilities": pa.ListArray.from_arrays(offsets, values),
        "model_version": pa.array([version] * n, pa.string()),
    }, schema=answers_schema())


def write_answers(model: Any, chunk: Chunk, writer: Any, tally: Tally) -> None:
    """One chunk through ``model`` (serving.runtime.OnnxModel) into ``writer`` (Parquet, or Arrow IPC from a
    cluster's actor), its bad rows and unseen categories counted in ``tally``."""
    tally.skip(chunk.errors, chunk.unseen)
    if not chunk.ids:
        return
    regression = bool(getattr(model, "regression", False))
    answers = model.predict_outputs(chunk.batch) if regression else model.predict_proba(chunk.batch)
    writer.write_table(answers_table(chunk.ids, answers, model.labels, model.metadata.get("model_version"), regression))
    tally.rows += len(chunk.ids)
