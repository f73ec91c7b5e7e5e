"""``embedding``: do the model's features differ? The input of its last linear layer (pipelines/monitor/embedding.py).

Few dimensions, and the ones the answers depend on: the most powerful of the signals on
images (bench/drift.py). Without a linear head the logits stand in.
"""

from __future__ import annotations

import numpy as np

from pipelines.monitor.signals.base import DriftSignal, Finding, Sample, register
from pipelines.reporting import figure_uri, image, new_figure


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


@register
class EmbeddingSignal(DriftSignal):
    name = "embedding"
    order = 20.0

    def features(self, sample: Sample) -> np.ndarray:
        return sample.embeddings

    def section(self, finding: Finding, labels: list[str]) -> tuple[str, str]:
        return ("Inputs: the model's embedding", image(_embedding_plot(finding.reference, finding.window),
                                                        "reference and window on the reference's first two PCs"))
