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
    from pipelines.settings import ValidationSettings

log = logging.getLogger(__name__)

_CHUNK = 8_192
_EXAMPLES = 10


@dataclass
class Validation:
    """Which samples survive, the labels after dropping empty classes, and the report."""

    keep: np.ndarray  # bool mask over the raw samples
    y: np.ndarray  # targets, remapped when empty classes were dropped
    labels: list[str]
    hashes: np.ndarray  # one 16-byte digest per raw sample (dtype S16)
    report: dict[str, Any] = field(default_factory=dict)


def _fix(setting: str, choice: str) -> str:
    return f"fix the data, or set data.validation.{setting}={choice} to {'skip' if choice == 'skip' else choice} them"


def _record(report: dict, check: str, policy: str, items: list[str], detail: str) -> None:
    report["checks"][check] = {"policy": policy, "count": len(items), "examples": items[:_EXAMPLES], "detail": detail}


def _enforce(check: str, policy: str, items: list[str], detail: str, source: str, setting: str) -> None:
    if items and policy == "fail":
        shown = ", ".join(items[:_EXAMPLES]) + (f" and {len(items) - _EXAMPLES} more" if len(items) > _EXAMPLES else "")
        raise FluxoError(f"{source}: {len(items)} {detail}: {shown}; {_fix(setting, 'skip')}")


def content_hashes(x: np.ndarray) -> np.ndarray:
    """A 16-byte digest per sample, read chunk by chunk so memory-mapped data is never loaded whole.

    Kept as one NumPy byte array (16 B a sample), not Python strings, so half a
    million samples cost 8 MB here rather than the decoded images' hundreds.
    """
    out = np.empty(len(x), dtype="S16")
    for start in range(0, len(x), _CHUNK):
        chunk = np.ascontiguousarray(x[start : start + _CHUNK])
        out[start : start + len(chunk)] = [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in chunk]
    return out


def first_occurrences(hashes: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """For each candidate index, the index of the first candidate with the same content."""
    if len(candidates) == 0:
        return candidates
    _, first, inverse = np.unique(hashes[candidates], return_index=True, return_inverse=True)
    return candidates[first][inverse.reshape(-1)]


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
    candidates = np.flatnonzero(keep)
    originals = first_occurrences(hashes, candidates)
    repeated = originals != candidates
    copies, sources = candidates[repeated], originals[repeated]
    duplicates = [f"{raw.sample_id(i)} (same as {raw.sample_id(o)})" for i, o in zip(copies, sources)]
    conflicting = []
    if raw.task == "classification":
        clash = raw.y[copies] != raw.y[sources]
        conflicting = [f"{raw.sample_id(i)} vs {raw.sample_id(o)}" for i, o in zip(copies[clash], sources[clash])]
    if policy.duplicates == "skip":
        keep[copies] = False
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
    hashes: np.ndarray, split_indices: dict[str, np.ndarray], policy: "ValidationSettings", ids: list[str],
    source: str, report: dict,
) -> None:
    """The same sample in two splits makes test scores lie; fail or report it."""
    leaks = []
    names = list(split_indices)
    for a, first in enumerate(names):
        for second in names[a + 1 :]:
            shared = np.intersect1d(hashes[split_indices[first]], hashes[split_indices[second]])
            if len(shared):
                members = split_indices[second][np.isin(hashes[split_indices[second]], shared)]
                leaks.extend(f"{ids[i]} ({first} and {second})" for i in members)
    if leaks and policy.leakage == "fail":
        raise FluxoError(
            f"{source}: {len(leaks)} samples appear in two splits: {', '.join(leaks[:_EXAMPLES])}; "
            "set data.validation.duplicates=skip, or data.validation.leakage=report to accept it"
        )
    _record(report, "leakage", policy.leakage, leaks, "samples present in two splits")
