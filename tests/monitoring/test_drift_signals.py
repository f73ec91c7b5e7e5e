"""Drift signals are pluggable: one object each, found in one registry, looped over by the monitor.

Fast and synthetic (no trained model): the built-in signals on real models are
tests/monitoring/test_monitor.py's.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import pipelines.monitor.signals as signals_package
from pipelines.monitor.detect import compare, drift_detected, scores
from pipelines.monitor.report import drift_report
from pipelines.monitor.signals import (
    DriftSignal,
    Finding,
    Sample,
    in_use,
    load_signals,
    register,
    registered,
)

ALPHA = 0.05
LABELS = ["a", "b", "c", "d"]


class MeanSignal(DriftSignal):
    """A toy: does the mean input value per instance differ?"""

    name = "mean"

    def features(self, sample: Sample) -> np.ndarray:
        return np.nanmean(sample.inputs.reshape(len(sample.inputs), -1), axis=1, keepdims=True)

    def section(self, finding: Finding, labels: list[str]) -> tuple[str, str]:
        shift = float(finding.window.mean() - finding.reference.mean())
        return "Mean input value", f"<p>window minus reference: {shift:.2f}</p>"


def _samples(shift: float) -> tuple[Sample, Sample]:
    """A reference and a window alike but for the window's inputs, moved by ``shift``."""
    rng = np.random.default_rng(0)

    def probabilities(n: int) -> np.ndarray:
        p = rng.random((n, len(LABELS))).astype(np.float32)
        return p / p.sum(1, keepdims=True)

    reference = Sample(rng.normal(size=(120, 1, 6, 6)).astype(np.float32),
                       rng.normal(size=(120, 8)).astype(np.float32), probabilities(120))
    window = Sample((rng.normal(size=(80, 1, 6, 6)) + shift).astype(np.float32),
                    rng.normal(size=(80, 8)).astype(np.float32), probabilities(80))
    return reference, window


def _summary(findings: dict[str, Finding]) -> dict:
    return {"model": "toy", "model_version": "1", "data_version": "0123.dir", "alpha": ALPHA,
            "window": {"start": "s", "end": "e", "instances": 80, "requests": 8}, "reference_size": 120,
            "drift_detected": drift_detected(findings),
            "scores": scores(findings)}


def test_the_built_in_signals_are_registered_in_their_order() -> None:
    assert [signal.name for signal in in_use()] == ["input", "embedding", "prediction"]


def test_a_toy_signal_registered_here_shows_up_in_the_result_and_the_report() -> None:
    reference, window = _samples(shift=0.5)
    with registered(MeanSignal):
        assert [signal.name for signal in in_use()][-1] == "mean"
        findings = compare(reference, window, ALPHA)
        summary = _summary(findings)
        report = drift_report(summary, findings, LABELS)
    assert "mean" not in {signal.name for signal in in_use()}, "registered() takes it out again"
    assert list(findings) == ["input", "embedding", "prediction", "mean"]
    assert {finding.test.level for finding in findings.values()} == {ALPHA / 4}, "alpha is split four ways now"
    mean = summary["scores"]["mean"]
    assert mean == {"signal": "mean", "statistic": mean["statistic"], "p_value": mean["p_value"],
                    "level": ALPHA / 4, "drift": True}
    assert summary["drift_detected"] is True
    assert findings["mean"].reference.shape == (120, 1) and findings["mean"].window.shape == (80, 1)
    assert "<td class=\"l\">mean</td>" in report, "a row of the verdict table"
    assert "Mean input value" in report and "window minus reference: 0.5" in report
    assert "split over four signals" in report
    assert report.index("Inputs: the model") < report.index("Predictions") < report.index("Mean input value")


def test_without_the_toy_the_report_says_three_signals_and_has_no_mean() -> None:
    reference, window = _samples(shift=0.0)
    findings = compare(reference, window, ALPHA)
    report = drift_report(_summary(findings), findings, LABELS)
    assert list(findings) == ["input", "embedding", "prediction"]
    assert "split over three signals" in report and "Mean input value" not in report


def test_a_new_signal_is_one_module_in_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file dropped beside the built-in signals registers itself: nothing else lists it."""
    (tmp_path / "toy_spread.py").write_text(textwrap.dedent('''
        import numpy as np

        from pipelines.monitor.signals.base import DriftSignal, register


        @register
        class SpreadSignal(DriftSignal):
            name = "spread"

            def features(self, sample):
                return np.nanstd(sample.inputs.reshape(len(sample.inputs), -1), axis=1, keepdims=True)
        '''))
    monkeypatch.setattr(signals_package, "__path__", [*signals_package.__path__, str(tmp_path)])
    try:
        assert [signal.name for signal in load_signals()] == ["input", "embedding", "prediction", "spread"]
        reference, window = _samples(shift=0.0)
        window = Sample(window.inputs * 2.0, window.embeddings, window.probabilities)
        findings = compare(reference, window, ALPHA)
        assert findings["spread"].test.drift and findings["spread"].test.level == ALPHA / 4
    finally:
        signals_package.unregister("spread")
        sys.modules.pop("pipelines.monitor.signals.toy_spread", None)
    assert [signal.name for signal in in_use()] == ["input", "embedding", "prediction"]


def test_a_name_is_registered_once() -> None:
    with registered(MeanSignal), pytest.raises(ValueError, match="registered already"):
        register(MeanSignal)
    with pytest.raises(ValueError, match="needs a name"):
        register(DriftSignal())
