"""The drift report: one HTML page per ``fluxo monitor`` run, logged to MLflow beside its metrics."""

from __future__ import annotations

import numpy as np

from pipelines.monitor.detect import TestResult
from pipelines.reporting import figure_uri, image, new_figure, page, table


def _embedding_plot(reference: np.ndarray, window: np.ndarray) -> str:
    """Both samples on the reference's first two principal components."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, random_state=0).fit(reference)
    figure, axes = new_figure()
    for values, label, color in ((reference, "reference", "#4c78a8"), (window, "window", "#e45756")):
        points = pca.transform(values)
        axes.scatter(points[:, 0], points[:, 1], s=6, alpha=0.5, label=label, color=color)
    axes.set_xlabel("PC 1")
    axes.set_ylabel("PC 2")
    axes.legend()
    return figure_uri(figure)


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


def drift_report(summary: dict, tests: dict[str, TestResult], reference_embedding: np.ndarray,
                 window_embedding: np.ndarray, reference_probabilities: np.ndarray,
                 window_probabilities: np.ndarray, labels: list[str]) -> str:
    verdict = "drift detected" if summary["drift_detected"] else "no drift detected"
    css = "bad" if summary["drift_detected"] else "good"
    rows = [(t.signal, f"{t.statistic:.5f}", f"{t.p_value:.3g}", f"{t.level:.3g}", "yes" if t.drift else "no")
            for t in tests.values()]
    window = summary["window"]
    facts = table(["", ""], [
        ("model", f"{summary['model']} v{summary['model_version']}"),
        ("data version (reference)", summary["data_version"]),
        ("reference", f"{summary['reference_size']} validation samples"),
        ("window", f"{window['start']} .. {window['end']}"),
        ("instances / requests", f"{window['instances']} / {window['requests']}"),
    ])
    sections = [
        ("Verdict", f'<p class="{css}">{verdict}</p>' + table(
            ["signal", "MMD statistic", "p-value", "level", "drift"], rows)),
        ("What was compared", facts),
        ("Inputs: the model's embedding", image(_embedding_plot(reference_embedding, window_embedding),
                                                 "reference and window on the reference's first two PCs")),
        ("Predictions", image(_class_share_plot(reference_probabilities, window_probabilities, labels),
                              "predicted class share") +
         image(_confidence_plot(reference_probabilities, window_probabilities), "top-class probability")),
    ]
    return page(f"Drift report: {summary['model']} v{summary['model_version']}",
                f"hyppo MMD (chi-square null), alpha {summary['alpha']} split over three signals", sections)
