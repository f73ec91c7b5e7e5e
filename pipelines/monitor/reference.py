"""The reference a window is compared with: validation samples of the data version the model was trained on.

The validation split, not the training split: the model fitted the training samples, so
their embeddings and probabilities are more confident than anything it meets later, and
clean traffic would look drifted against them. Validation and test samples were held out
alike, so clean traffic from the same source is indistinguishable from the reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.data.store import read_dataset
from pipelines.data.versioning import checkout_version, read_data_version
from pipelines.errors import FluxoError
from pipelines.monitor.embedding import Embedded, Embedder
from pipelines.settings import FluxoSettings
from serving.contract import TableInput

log = logging.getLogger(__name__)


@dataclass
class Reference:
    data_version: str
    inputs: np.ndarray
    embedded: Embedded
    labels: np.ndarray
    table: TableInput | None = None  # a table model's columns: its inputs are raw columns, NaN an empty cell


def data_dir_for(root: Path, settings: FluxoSettings, md5: str) -> Path:
    """``data/`` when it still holds ``md5``, else a checkout of that version under ``.fluxo/monitor/data``."""
    current = Path(root) / settings.data.data_dir
    dvc_file = current.with_name(current.name + ".dvc")
    if dvc_file.is_file() and read_data_version(dvc_file).md5 == md5 and (current / "dataset.json").is_file():
        return current
    target = Path(root) / ".fluxo" / "monitor" / "data" / md5.removesuffix(".dir")
    return checkout_version(Path(root), md5, target, settings.data.dvc_remote, settings.data.dvc_remote_endpoint_url)


def load_reference(root: Path, settings: FluxoSettings, metadata: dict, embedder: Embedder) -> Reference:
    """A seeded sample of ``monitor.reference_size`` validation samples, as the served graph sees them."""
    md5 = metadata.get("data_version")
    if not md5:
        raise FluxoError(f"model {metadata.get('model_name')} records no data_version; re-export it with fluxo")
    dataset = read_dataset(data_dir_for(root, settings, str(md5)))
    if tuple(dataset.input_shape) != tuple(metadata["input_shape"]):
        raise FluxoError(f"data version {md5} has inputs {dataset.input_shape}, the model {metadata['input_shape']}")
    val = dataset.splits["val"]
    if len(val) < 10:
        raise FluxoError(f"data version {md5} has {len(val)} validation samples; at least 10 are needed as reference")
    rng = np.random.default_rng(settings.monitor.seed)
    rows = np.sort(rng.choice(len(val), min(settings.monitor.reference_size, len(val)), replace=False))
    inputs = np.asarray(val.x[rows], dtype=np.float32)  # splits are stored class by class: sample, never slice
    lengths = None if val.lengths is None else np.asarray(val.lengths)[rows]
    return Reference(str(md5), inputs, embedder(inputs, lengths), np.asarray(val.y)[rows], table_contract(metadata))


def table_contract(metadata: dict) -> TableInput | None:
    """A table model's columns (metadata.json ``table``), None for other kinds; a table without them is an error:
    its columns cannot be tested one by one, and MMD over raw columns would read category codes as numbers."""
    if metadata.get("kind") != "table":
        return None
    if not metadata.get("table"):
        raise FluxoError(f"model {metadata.get('model_name')} takes a table but its metadata.json lists no columns; "
                         "re-export it with fluxo")
    return TableInput.model_validate(metadata["table"])
