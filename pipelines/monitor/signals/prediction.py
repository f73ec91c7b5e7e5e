"""``prediction``: do the model's answers differ? Its class probabilities, the window's as the service answered.

Misses anything the model still answers confidently; its report section shows the
predicted class shares and the top-class confidence of both sides. A regression model
answers one value per instance: those are compared (two-sample Kolmogorov-Smirnov,
pipelines/monitor/columns.py), and the section shows both sides' histograms.
"""

from __future__ import annotations

import numpy as np

from pipelines.monitor.columns import ks_test
from pipelines.monitor.signals.base import DriftSignal, Finding, Sample, register
from pipelines.reporting import figure_uri, image, new_figure


def _class_share_plot(reference: np.ndarray, window: np.ndarray, labels: list[str]) -> str:
    classes = len(labels)
    ref = np.bincount(reference.argmax(1), minlength=classes) / max(len(reference), 1)
    win = np.bincount(window.argmax(1), minlength=classes) / max(len(window), 1)
    figure, axes = new_figure(max(5.0, classes * 0.45), 3.5)
    positions = np.arange(classes)
    axes.bar(positions - 0.2, ref, 0.4, label="reference", color="#4c78a8")
    axes.bar(positions + 0.2, win, 0.4, label="window", color="#e45756")
    axes.set_xticks(positions, labels, rotation=45 if classes > 12 else 0)
    axes.set_ylabel("share of predictions")
    axes.legend()
    return figure_uri(figure)


def _confidence_plot(reference: np.ndarray, window: np.ndarray) -> str:
    figure, axes = new_figure()
    bins = np.linspace(0, 1, 21)
    axes.hist(reference.max(1), bins=bins, alpha=0.6, density=True, label="reference", color="#4c78a8")
    axes.hist(window.max(1), bins=bins, alpha=0.6, density=True, label="window", color="#e45756")
    axes.set_xlabel("top-class probability")
    axes.legend()
    return figure_uri(figure)


def _value_plot(reference: np.ndarray, window: np.ndarray) -> str:
    figure, axes = new_figure()
    both = np.concatenate([reference, window])
    both = both[np.isfinite(both)]
    bins = np.linspace(both.min(), both.max(), 31) if len(both) and both.min() < both.max() else 30
    axes.hist(reference, bins=bins, alpha=0.6, density=True, label="reference", color="#4c78a8")
    axes.hist(window, bins=bins, alpha=0.6, density=True, label="window", color="#e45756")
    axes.set_xlabel("predicted value")
    axes.legend()
    return figure_uri(figure)


@register
class PredictionSignal(DriftSignal):
    name = "prediction"
    order = 30.0

    def features(self, sample: Sample) -> np.ndarray:
        if sample.values is not None:
            return np.asarray(sample.values, np.float64).reshape(-1)
        return sample.probabilities

    def compare(self, reference: Sample, window: Sample, level: float) -> Finding:
        if reference.values is None:
            return super().compare(reference, window, level)
        if window.values is None:
            raise ValueError("the reference holds a regression model's values, the window none")
        ref, win = self.reference(reference), self.summarize(window)
        return Finding(self, ref, win, ks_test(self.name, ref, win, level))

    def section(self, finding: Finding, labels: list[str]) -> tuple[str, str]:
        if finding.reference.ndim == 1:  # a regression model's values
            return ("Predictions", image(_value_plot(finding.reference, finding.window),
                                         f"predicted {labels[0] if labels else 'value'}"))
        return ("Predictions", image(_class_share_plot(finding.reference, finding.window, labels),
                                     "predicted class share") +
                image(_confidence_plot(finding.reference, finding.window), "top-class probability"))
