"""The decision of ``fluxo monitor``: every drift signal in use tested on the window, Bonferroni-corrected.

No single signal sees everything. The embedding missed noise on MNIST-1D (1/10: the GRU
is robust to it, so its features do not move) where the raw inputs saw 8/10; the class
probabilities miss anything the model still answers confidently. So several questions
(the signals of pipelines/monitor/signals/: do the raw inputs differ, do the model's
features differ, do its answers differ?), each at ``alpha`` divided by their number, so
that one alarm on clean traffic stays within ``alpha`` (Bonferroni). The test itself:
pipelines/monitor/mmd.py; a table's columns and a regression model's values are tested one
value at a time instead (pipelines/monitor/columns.py), the columns' tests sharing their
signal's level the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


from pipelines.monitor.mmd import TestResult, mmd_test
from pipelines.monitor.signals import DriftSignal, Finding, Sample, in_use

__all__ = ["TestResult", "compare", "drift_detected", "mmd_test", "scores"]


def compare(reference: Sample, window: Sample, alpha: float,
            signals: Sequence[DriftSignal] | None = None) -> dict[str, Finding]:
    """Each signal in use (or of ``signals``) on ``window`` against ``reference``, at ``alpha / len(signals)``."""
    chosen = in_use() if signals is None else tuple(signals)
    if not chosen:
        raise ValueError("no drift signal in use (pipelines/monitor/signals/)")
    level = alpha / len(chosen)
    findings = {}
    for signal in chosen:
        findings[signal.name] = signal.compare(reference, window, level)
    return findings


def scores(findings: Mapping[str, Finding]) -> dict[str, dict[str, Any]]:
    """The summary's ``scores``: each signal's entry under its name."""
    return {name: finding.signal.score(finding.test) for name, finding in findings.items()}


def drift_detected(findings: Mapping[str, Finding]) -> bool:
    return any(finding.test.drift for finding in findings.values())
