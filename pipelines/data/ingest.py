"""The ingest step: source → validated, split dataset under ``data/`` → DVC version."""

from __future__ import annotations

import logging
from pathlib import Path

from pipelines.config import DataSettings
from pipelines.data.sources import load_builtin
from pipelines.data.split import stratified_split
from pipelines.data.store import write_dataset
from pipelines.data.versioning import DataVersion, version_data

log = logging.getLogger(__name__)


def ingest(root: Path, settings: DataSettings) -> Path:
    """Write the configured dataset, split and validated, under ``root / data_dir``."""
    raw = load_builtin(settings.dataset)
    indices = stratified_split(raw, settings.val_fraction, settings.test_fraction, settings.split_seed)
    split_info = {
        "seed": settings.split_seed,
        "val_fraction": settings.val_fraction,
        "test_fraction": settings.test_fraction,
        "source_test_split": raw.fixed_test is not None,
    }
    return write_dataset(raw, indices, Path(root) / settings.data_dir, split_info)


def version(root: Path, settings: DataSettings) -> DataVersion:
    """Track ``data_dir`` with DVC and push it to the configured remote."""
    return version_data(
        Path(root), settings.data_dir, settings.dvc_remote, settings.push, settings.dvc_remote_endpoint_url
    )
