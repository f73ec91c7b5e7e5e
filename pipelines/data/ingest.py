"""The ingest step: source → validation → split → ``data/`` + ``data.dvc``, as one transaction.

The new dataset is staged beside ``data/``, swapped in, and ``dvc add``-ed; if any of
that fails or is interrupted, the previous ``data/`` and ``data.dvc`` are restored.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.settings import DataSettings
from pipelines.data.sources import load_source
from pipelines.data.split import stratified_split
from pipelines.data.store import write_dataset
from pipelines.data.validate import check_leakage, validate
from pipelines.data.versioning import DataVersion, push_data, read_data_version, version_data

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ingested:
    """What ingest hands on: the validation report and the data version it recorded (``dvc add`` done)."""

    report: dict[str, Any]
    version: DataVersion


def ingest(root: Path, settings: DataSettings, model_name: str | None = None) -> Ingested:
    """Write the configured dataset, validated and split, under ``root / data_dir``, and ``dvc add`` it once.

    ``model_name`` is the run's model.name: a table or sequence model reads a CSV/Parquet file
    as its kind of input when data.sequence.kind is auto."""
    root = Path(root)
    data_dir = root / settings.data_dir
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.scratch-", dir=data_dir.parent))
    dvc_file = data_dir.with_name(data_dir.name + ".dvc")
    previous_dvc = dvc_file.read_bytes() if dvc_file.exists() else None
    try:
        raw = load_source(settings, scratch, model_name)
        checked = validate(raw, settings.validation)
        raw.y, raw.labels = checked.y, checked.labels
        indices = stratified_split(
            raw.y,
            checked.keep.nonzero()[0],
            settings.val_fraction,
            settings.test_fraction,
            settings.split_seed,
            task=raw.task,
            fixed_test=raw.fixed_test,
            folds=settings.folds,
            fold=settings.fold,
        )
        ids = raw.ids or [f"sample {i}" for i in range(len(raw.y))]
        check_leakage(checked.hashes, indices, settings.validation, ids, raw.description or raw.name, checked.report)
        split_info = {
            "seed": settings.split_seed,
            "val_fraction": settings.val_fraction,
            "test_fraction": settings.test_fraction,
            "folds": settings.folds,
            "fold": settings.fold if settings.folds else None,
            "source_test_split": raw.fixed_test is not None,
        }

        def track(new_dir: Path) -> None:
            version_data(root, settings.data_dir, settings.dvc_remote, push=False,
                         endpoint_url=settings.dvc_remote_endpoint_url)

        write_dataset(raw, indices, data_dir, split_info, checked.report, settings.shard_size, after_swap=track)
    except BaseException:
        _restore(dvc_file, previous_dvc)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _log_summary(checked.report)
    return Ingested(checked.report, read_data_version(dvc_file))


def _restore(dvc_file: Path, previous: bytes | None) -> None:
    if previous is None:
        dvc_file.unlink(missing_ok=True)
    elif not dvc_file.exists() or dvc_file.read_bytes() != previous:
        dvc_file.write_bytes(previous)


def _log_summary(report: dict[str, Any]) -> None:
    problems = {name: c["count"] for name, c in report["checks"].items() if c["count"]}
    log.info(
        "validated %s: kept %d of %d samples%s",
        report["source"],
        report["samples_kept"],
        report["samples_found"],
        f"; problems {problems}" if problems else "",
    )


def push(root: Path, settings: DataSettings) -> int:
    """Push the recorded data version to the configured remote (when ``data.push``); objects sent."""
    if not settings.push:
        return 0
    return push_data(Path(root), settings.dvc_remote, settings.dvc_remote_endpoint_url)


def version(root: Path, settings: DataSettings) -> DataVersion:
    """Track whatever ``data_dir`` holds now with DVC and push it (for steps run without ingest)."""
    return version_data(
        Path(root), settings.data_dir, settings.dvc_remote, settings.push, settings.dvc_remote_endpoint_url
    )
