"""Checks at ingest, each with a policy: fail with a message that names the samples and the fix,
or skip them and report. Every check runs before anything fails, and the one error lists all that
was found (skipped problems too), so a user fixes a dataset in one round rather than one per run.
The report is saved beside the data (part of its version) and logged to MLflow."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.data.raw import RawDataset
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


class ValidationFailed(FluxoError):
    """Ingest validation found problems its policies do not let through; ``report`` holds every check."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report if report is not None else {}


_LET_THROUGH = {"skip": "skipped", "keep": "kept", "report": "reported"}


@dataclass
class Finding:
    """What one check found, under which policy, and what would let it through.

    ``detail`` is the report's wording (saved in validation.json, so kept stable);
    ``phrase`` the message's. ``total`` counts the items when ``items`` are only examples.
    """

    check: str
    policy: str
    items: list[str]
    detail: str
    phrase: str
    fix: str = ""
    summary: str = ""  # replaces "<count> <phrase>: <examples>" where one sentence says more
    note: str = ""  # appended after the examples
    total: int | None = None

    @property
    def count(self) -> int:
        return len(self.items) if self.total is None else self.total

    @property
    def fails(self) -> bool:
        return self.count > 0 and self.policy == "fail"

    def line(self) -> str:
        what = self.summary or f"{self.count} {self.phrase}: {_examples(self.items, self.count)}{self.note}"
        if self.fails:
            return f"{what}; {self.fix}"
        return f"{_LET_THROUGH.get(self.policy, self.policy)}: {what} (data.validation.{self.check}={self.policy})"


def _examples(items: list[str], total: int) -> str:
    shown = items[:_EXAMPLES]
    return ", ".join(shown) + (f" and {total - len(shown)} more" if total > len(shown) else "")


def _fix(setting: str) -> str:
    return f"fix the data, or set data.validation.{setting}=skip to skip them"


def _record(report: dict, finding: Finding) -> None:
    report["checks"][finding.check] = {
        "policy": finding.policy,
        "count": finding.count,
        "examples": finding.items[:_EXAMPLES],
        "detail": finding.detail,
    }


def _raise_if_failed(source: str, findings: list[Finding], report: dict) -> None:
    """One error for the whole run, naming every problem, skipped ones too: the user fixes all in one go."""
    failed = [f.check for f in findings if f.fails]
    if not failed:
        return
    lines = "".join(f"\n  - {f.line()}" for f in findings if f.count)
    raise ValidationFailed(f"{source}: validation failed ({', '.join(failed)}); every problem found:{lines}", report)


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


def _non_finite(x: np.ndarray, empty_cells: bool = False) -> np.ndarray:
    """Samples holding NaN or Inf; with ``empty_cells`` (a table, whose empty cells are NaN and
    handled by data.sequence.missing) only those holding Inf."""
    if not np.issubdtype(x.dtype, np.floating):
        return np.zeros(len(x), dtype=bool)
    bad = np.zeros(len(x), dtype=bool)
    for start in range(0, len(x), _CHUNK):
        chunk = np.asarray(x[start : start + _CHUNK]).reshape(min(_CHUNK, len(x) - start), -1)
        bad[start : start + len(chunk)] = (np.isinf(chunk) if empty_cells else ~np.isfinite(chunk)).any(axis=1)
    return bad



def validate(raw: RawDataset, policy: "ValidationSettings") -> Validation:
    """Run every check, then raise once, naming every problem, if a ``fail`` check found something.

    A failing check drops what it found just as ``skip`` would, so the checks after it see the
    data its suggested fix gives: one run lists everything to fix, not one problem per run.
    """
    source = raw.description or raw.name
    report: dict[str, Any] = {"source": source, "samples_found": len(raw.y), "checks": {}}
    keep = np.ones(len(raw.y), dtype=bool) if raw.readable is None else raw.readable.copy()

    corrupt = _corrupt_check(raw, policy)
    _record(report, corrupt)
    found = _source_checks(raw)  # always fail: no setting skips them (a missing target, ...)
    for finding in found:
        _record(report, finding)

    non_finite, bad = _non_finite_check(raw, keep, policy)
    _record(report, non_finite)
    keep &= ~bad

    hashes = content_hashes(raw.x)
    duplicates, copies, conflicting = _duplicate_check(raw, keep, hashes, policy)
    if policy.duplicates != "keep":
        keep[copies] = False
    _record(report, duplicates)
    if conflicting:
        report["checks"]["duplicates"]["conflicting_labels"] = conflicting[:_EXAMPLES]
    findings = [corrupt, *found, non_finite, duplicates]

    y, labels = raw.y, list(raw.labels)
    if raw.task == "classification":
        y, labels, keep, class_findings = _check_classes(raw, keep, policy, report)
        findings += class_findings
    report["samples_kept"] = int(keep.sum())
    if report["samples_kept"] == 0:
        detail = "no usable samples left after validation"
        nothing = Finding("no_samples", "fail", [source], detail, "", "fix the problems listed so some remain", detail)
        _record(report, nothing)
        findings.append(nothing)
    _raise_if_failed(source, findings, report)
    return Validation(keep, y, labels, hashes, report)


def _corrupt_check(raw: RawDataset, policy: "ValidationSettings") -> Finding:
    items = sorted({item for p in raw.problems if p.check == "corrupt" for item in p.items})
    detail = "unreadable, corrupt or non-image files"
    return Finding("corrupt", policy.corrupt, items, detail, detail, _fix("corrupt"))


def _source_checks(raw: RawDataset) -> list[Finding]:
    """Problems the reader found in single samples (a missing target) that no setting lets through."""
    grouped: dict[str, list[str]] = {}
    phrases: dict[str, str] = {}
    for problem in raw.problems:
        if problem.check != "corrupt":
            grouped.setdefault(problem.check, []).extend(problem.items)
            phrases.setdefault(problem.check, problem.message)
    fix = "fill or remove them in the file; no setting skips these"
    return [Finding(check, "fail", items, phrases[check], phrases[check], fix) for check, items in grouped.items()]


def _non_finite_check(raw: RawDataset, keep: np.ndarray, policy: "ValidationSettings") -> tuple[Finding, np.ndarray]:
    bad = _non_finite(raw.x, empty_cells=raw.kind == "table") & keep
    items = [raw.sample_id(i) for i in np.flatnonzero(bad)]
    finding = Finding("non_finite", policy.non_finite, items, "samples containing NaN or Inf",
                      "samples contain NaN or Inf", _fix("non_finite"))
    return finding, bad


def _duplicate_check(
    raw: RawDataset, keep: np.ndarray, hashes: np.ndarray, policy: "ValidationSettings"
) -> tuple[Finding, np.ndarray, list[str]]:
    """Later copies of a sample (the first one stays), and copies whose labels disagree."""
    candidates = np.flatnonzero(keep)
    originals = first_occurrences(hashes, candidates)
    repeated = originals != candidates
    copies, sources = candidates[repeated], originals[repeated]
    items = [f"{raw.sample_id(i)} (same as {raw.sample_id(o)})" for i, o in zip(copies, sources)]
    conflicting: list[str] = []
    if raw.task == "classification":
        clash = raw.y[copies] != raw.y[sources]
        conflicting = [f"{raw.sample_id(i)} vs {raw.sample_id(o)}" for i, o in zip(copies[clash], sources[clash])]
    note = ""
    if conflicting:
        note = f" ({len(conflicting)} with different labels: {_examples(conflicting, len(conflicting))})"
    finding = Finding("duplicates", policy.duplicates, items, "identical samples (content hash)",
                      "duplicate samples", _fix("duplicates"), note=note)
    return finding, copies, conflicting


def _check_classes(
    raw: RawDataset, keep: np.ndarray, policy: "ValidationSettings", report: dict
) -> tuple[np.ndarray, list[str], np.ndarray, list[Finding]]:
    """Empty classes, too few classes and imbalance, on the samples the earlier checks kept."""
    counts = np.bincount(raw.y[keep], minlength=len(raw.labels))
    empty = Finding("empty_class", policy.empty_class, [raw.labels[c] for c in np.flatnonzero(counts == 0)],
                    "classes with no usable sample", "classes have no usable sample", _fix("empty_class"))
    _record(report, empty)
    findings = [empty]
    present = np.flatnonzero(counts > 0)
    if len(present) == 1:
        findings.append(_too_few_classes(raw.labels[present[0]]))
        _record(report, findings[-1])
    remap = np.full(len(raw.labels), -1, dtype=np.int64)
    remap[present] = np.arange(len(present))
    labels = [raw.labels[c] for c in present]
    y = remap[raw.y]
    if len(present):
        kept_counts = counts[present]
        ratio = float(kept_counts.max() / kept_counts.min())
        report["classes"] = {label: int(c) for label, c in zip(labels, kept_counts)}
        report["imbalance_ratio"] = round(ratio, 3)
        if len(present) > 1 and policy.max_imbalance is not None and ratio > policy.max_imbalance:
            findings.append(_imbalance(labels, kept_counts, ratio, policy.max_imbalance))
            _record(report, findings[-1])
    return y, labels, keep & (y >= 0), findings


def _too_few_classes(label: str) -> Finding:
    summary = f"only one class with samples ({label})"
    return Finding("too_few_classes", "fail", [label], "only one class with samples", "", summary=summary,
                   fix="classification needs two or more; add samples of another class")


def _imbalance(labels: list[str], counts: np.ndarray, ratio: float, limit: float) -> Finding:
    largest, smallest = labels[int(counts.argmax())], labels[int(counts.argmin())]
    pair = f"{largest!r} {counts.max()} vs {smallest!r} {counts.min()}"
    return Finding(
        "max_imbalance", "fail", [pair], f"class imbalance above data.validation.max_imbalance={limit}", "",
        summary=f"class imbalance {ratio:.1f} ({pair}) exceeds data.validation.max_imbalance={limit}",
        fix="add data, raise the limit, or set train.balance=weighted",
    )


def check_leakage(
    hashes: np.ndarray, split_indices: dict[str, np.ndarray], policy: "ValidationSettings", ids: list[str],
    source: str, report: dict,
) -> None:
    """The same sample in two splits makes test scores lie; fail (listing what validation let through) or report it."""
    leaks = []
    names = list(split_indices)
    for a, first in enumerate(names):
        for second in names[a + 1 :]:
            shared = np.intersect1d(hashes[split_indices[first]], hashes[split_indices[second]])
            if len(shared):
                members = split_indices[second][np.isin(hashes[split_indices[second]], shared)]
                leaks.extend(f"{ids[i]} ({first} and {second})" for i in members)
    leakage = Finding(
        "leakage", policy.leakage, leaks, "samples present in two splits", "samples appear in two splits",
        "set data.validation.duplicates=skip, or data.validation.leakage=report to accept it",
    )
    earlier = [
        Finding(name, check["policy"], check["examples"], check["detail"], check["detail"], total=check["count"])
        for name, check in report["checks"].items()
        if name != "leakage"
    ]
    _record(report, leakage)
    _raise_if_failed(source, [*earlier, leakage], report)
