"""Checks at ingest, each with a policy: fail with a message that names the samples and the fix,
or skip them and report. The report is saved beside the data (part of its version) and logged to MLflow."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.data.sources import RawDataset
from pipelines.errors import FluxoError

if TYPE_CHECKING:
    from pipelines.config import ValidationSettings

log = logging.getLogger(__name__)

_CHUNK = 8_192
_EXAMPLES = 10


@dataclass
class Validation:
    """Which samples survive, the labels after dropping empty classes, and the report."""

    keep: np.ndarray  # bool mask over the raw samples
    y: np.ndarray  # targets, remapped when empty classes were dropped
    labels: list[str]
    hashes: list[str]
    report: dict[str, Any] = field(default_factory=dict)


def _fix(setting: str, choice: str) -> str:
    return f"fix the data, or set data.validation.{setting}={choice} to {'skip' if choice == 'skip' else choice} them"


def _record(report: dict, check: str, policy: str, items: list[str], detail: str) -> None:
    report["checks"][check] = {"policy": policy, "count": len(items), "examples": items[:_EXAMPLES], "detail": detail}


def _enforce(check: str, policy: str, items: list[str], detail: str, source: str, setting: str) -> None:
    if items and policy == "fail":
        shown = ", ".join(items[:_EXAMPLES]) + (f" and {len(items) - _EXAMPLES} more" if len(items) > _EXAMPLES else "")
        raise FluxoError(f"{source}: {len(items)} {detail}: {shown}; {_fix(setting, 'skip')}")


def content_hashes(x: np.ndarray) -> list[str]:
    """A digest per sample, read chunk by chunk so memory-mapped data is never loaded whole."""
    out: list[str] = []
    for start in range(0, len(x), _CHUNK):
        chunk = np.ascontiguousarray(x[start : start + _CHUNK])
        out.extend(hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() for row in chunk)
    return out


def _non_finite(x: np.ndarray) -> np.ndarray:
    if not np.issubdtype(x.dtype, np.floating):
        return np.zeros(len(x), dtype=bool)
    bad = np.zeros(len(x), dtype=bool)
    for start in range(0, len(x), _CHUNK):
        chunk = np.asarray(x[start : start + _CHUNK])
        bad[start : start + len(chunk)] = ~np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
    return bad


def validate(raw: RawDataset, policy: "ValidationSettings") -> Validation:
    """Run every check in order; raise on a ``fail`` policy, otherwise drop what is skipped and report it."""
    source = raw.description or raw.name
    n = len(raw.y)
    report: dict[str, Any] = {"source": source, "samples_found": n, "checks": {}}
    keep = np.ones(n, dtype=bool) if raw.readable is None else raw.readable.copy()

    corrupt = sorted({item for p in raw.problems if p.check == "corrupt" for item in p.items})
    _enforce("corrupt", policy.corrupt, corrupt, "unreadable, corrupt or non-image files", source, "corrupt")
    _record(report, "corrupt", policy.corrupt, corrupt, "unreadable, corrupt or non-image files")

    bad = _non_finite(raw.x) & keep
    items = [raw.sample_id(i) for i in np.flatnonzero(bad)]
    _enforce("non_finite", policy.non_finite, items, "samples contain NaN or Inf", source, "non_finite")
    _record(report, "non_finite", policy.non_finite, items, "samples containing NaN or Inf")
    keep &= ~bad

    hashes = content_hashes(raw.x)
    first_seen: dict[str, int] = {}
    duplicates, conflicting = [], []
    for i in np.flatnonzero(keep):
        digest = hashes[i]
        if digest in first_seen:
            original = first_seen[digest]
            duplicates.append(f"{raw.sample_id(i)} (same as {raw.sample_id(original)})")
            if raw.task == "classification" and raw.y[i] != raw.y[original]:
                conflicting.append(f"{raw.sample_id(i)} vs {raw.sample_id(original)}")
            if policy.duplicates == "skip":
                keep[i] = False
        else:
            first_seen[digest] = int(i)
    if duplicates and policy.duplicates == "fail":
        _enforce("duplicates", "fail", duplicates, "duplicate samples", source, "duplicates")
    _record(report, "duplicates", policy.duplicates, duplicates, "identical samples (content hash)")
    if conflicting:
        report["checks"]["duplicates"]["conflicting_labels"] = conflicting[:_EXAMPLES]

    y, labels = raw.y, list(raw.labels)
    if raw.task == "classification":
        y, labels, keep = _check_classes(raw, keep, policy, report, source)
    report["samples_kept"] = int(keep.sum())
    if report["samples_kept"] == 0:
        raise FluxoError(f"{source}: no usable samples left after validation; see the problems above")
    return Validation(keep, y, labels, hashes, report)


def _check_classes(
    raw: RawDataset, keep: np.ndarray, policy: "ValidationSettings", report: dict, source: str
) -> tuple[np.ndarray, list[str], np.ndarray]:
    counts = np.bincount(raw.y[keep], minlength=len(raw.labels))
    empty = [raw.labels[c] for c in np.flatnonzero(counts == 0)]
    _enforce("empty_class", policy.empty_class, empty, "classes have no usable sample", source, "empty_class")
    _record(report, "empty_class", policy.empty_class, empty, "classes with no usable sample")
    present = np.flatnonzero(counts > 0)
    if len(present) < 2:
        names = ", ".join(raw.labels[c] for c in present) or "none"
        raise FluxoError(f"{source}: only one class with samples ({names}); classification needs two or more")
    remap = np.full(len(raw.labels), -1, dtype=np.int64)
    remap[present] = np.arange(len(present))
    labels = [raw.labels[c] for c in present]
    y = remap[raw.y]
    kept_counts = counts[present]
    ratio = float(kept_counts.max() / kept_counts.min())
    report["classes"] = {label: int(c) for label, c in zip(labels, kept_counts)}
    report["imbalance_ratio"] = round(ratio, 3)
    if policy.max_imbalance is not None and ratio > policy.max_imbalance:
        largest, smallest = labels[int(kept_counts.argmax())], labels[int(kept_counts.argmin())]
        raise FluxoError(
            f"{source}: class imbalance {ratio:.1f} ({largest!r} {kept_counts.max()} vs {smallest!r} "
            f"{kept_counts.min()}) exceeds data.validation.max_imbalance={policy.max_imbalance}; add data, raise "
            "the limit, or set train.balance=weighted"
        )
    return y, labels, keep & (y >= 0)


def check_leakage(
    hashes: list[str], split_indices: dict[str, np.ndarray], policy: "ValidationSettings", ids: list[str], source: str,
    report: dict,
) -> None:
    """The same sample in two splits makes test scores lie; fail or report it."""
    seen: dict[str, str] = {}
    leaks = []
    for split, indices in split_indices.items():
        for i in indices:
            owner = seen.setdefault(hashes[i], split)
            if owner != split:
                leaks.append(f"{ids[i]} ({owner} and {split})")
    if leaks and policy.leakage == "fail":
        raise FluxoError(
            f"{source}: {len(leaks)} samples appear in two splits: {', '.join(leaks[:_EXAMPLES])}; "
            "set data.validation.duplicates=skip, or data.validation.leakage=report to accept it"
        )
    _record(report, "leakage", policy.leakage, leaks, "samples present in two splits")
