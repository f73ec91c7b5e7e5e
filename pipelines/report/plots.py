"""The model report's figures, each returned as a PNG data URI (pipelines/reporting.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pipelines.report.evaluation import Calibration
from pipelines.reporting import figure_uri, new_figure


def confusion_figure(confusion: np.ndarray, labels: Sequence[str]) -> str:
    figure, axis = new_figure(5.5, 4.8)
    shown = axis.imshow(confusion, cmap="Blues")
    ticks = range(len(labels))
    axis.set_xticks(ticks, labels, rotation=90 if len(labels) > 12 else 0)
    axis.set_yticks(ticks, labels)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    if len(labels) <= 20:
        high = confusion.max() or 1
        for (i, j), count in np.ndenumerate(confusion):
            axis.text(j, i, str(count), ha="center", va="center", fontsize=7,
                      color="white" if count > high / 2 else "#1d232a")
    figure.colorbar(shown, ax=axis, fraction=0.046)
    return figure_uri(figure)


def reliability_figure(result: Calibration) -> str:
    """Accuracy per confidence bin against the diagonal a calibrated model would follow."""
    figure, axis = new_figure(4.8, 4.2)
    edges = np.asarray(result.bin_edges)
    centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    accuracy = [a if a is not None else 0.0 for a in result.bin_accuracy]
    axis.bar(centres, accuracy, width=width * 0.95, color="#4c78a8", edgecolor="white", label="accuracy in bin")
    confidence = [(c, conf) for c, conf in zip(centres, result.bin_confidence) if conf is not None]
    if confidence:
        axis.plot([c for c, _ in confidence], [conf for _, conf in confidence], "o", color="#e45756", ms=4,
                  label="mean confidence")
    axis.plot([0, 1], [0, 1], "--", color="#57606a", lw=1, label="calibrated")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("confidence (top probability)")
    axis.set_ylabel("accuracy")
    axis.set_title(f"ECE {result.ece:.3f}")
    axis.legend(loc="lower right", fontsize=8)
    return figure_uri(figure)


def predicted_vs_true_figure(truth: np.ndarray, values: np.ndarray, target: str) -> str:
    """Each test sample's answer against its true value, with the diagonal a perfect model would sit on."""
    figure, axis = new_figure(4.8, 4.4)
    axis.scatter(truth, values, s=10, alpha=0.6, color="#4c78a8", edgecolors="none")
    finite = np.concatenate([np.asarray(truth, np.float64), np.asarray(values, np.float64)])
    finite = finite[np.isfinite(finite)]
    if finite.size:
        low, high = float(finite.min()), float(finite.max())
        axis.plot([low, high], [low, high], "--", color="#57606a", lw=1, label="predicted = true")
        axis.legend(loc="upper left", fontsize=8)
    axis.set_xlabel(f"true {target}")
    axis.set_ylabel(f"predicted {target}")
    axis.grid(alpha=0.3)
    return figure_uri(figure)


def residuals_figure(truth: np.ndarray, values: np.ndarray) -> str:
    """Residuals (true − predicted) against the prediction, and their histogram."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    residuals = np.asarray(truth, np.float64) - np.asarray(values, np.float64)
    figure, (scatter, histogram) = plt.subplots(1, 2, figsize=(9.6, 3.6))
    scatter.scatter(values, residuals, s=10, alpha=0.6, color="#4c78a8", edgecolors="none")
    scatter.axhline(0.0, ls="--", color="#57606a", lw=1)
    scatter.set_xlabel("predicted")
    scatter.set_ylabel("residual (true − predicted)")
    scatter.grid(alpha=0.3)
    histogram.hist(residuals[np.isfinite(residuals)], bins=min(40, max(5, len(residuals) // 5)), color="#4c78a8",
                   edgecolor="white")
    histogram.axvline(0.0, ls="--", color="#57606a", lw=1)
    histogram.set_xlabel("residual (true − predicted)")
    histogram.set_ylabel("samples")
    return figure_uri(figure)


def learning_curves_figure(history: Mapping[str, Sequence[tuple[int, float]]]) -> str | None:
    """Loss and accuracy (or a regression's validation R²) per epoch; None when the run logged no curves."""
    panels = [[key for key in ("train_loss", "val_loss") if history.get(key)],
              [key for key in ("train_accuracy", "val_accuracy") if history.get(key)],
              [key for key in ("val_r2",) if history.get(key)]]
    panels = [keys for keys in panels if keys]
    if not panels:
        return None
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.4), squeeze=False)
    for axis, keys in zip(axes[0], panels):
        for key in keys:
            steps, values = zip(*history[key])
            axis.plot(steps, values, marker="o", ms=3, label=key)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    return figure_uri(figure)


def sample_figure(x: np.ndarray, kind: str, title: str) -> str:
    """One input as a person reads it: an image for image data, one line per channel for sequences."""
    figure, axis = new_figure(2.2, 2.2) if kind == "image" else new_figure(3.4, 2.0)
    values = np.asarray(x, dtype=np.float32)
    if kind == "image" and values.ndim == 3:
        if values.shape[0] in (3, 4):
            shown = values[:3].transpose(1, 2, 0)
            shown = (shown - shown.min()) / (np.ptp(shown) or 1.0)
            axis.imshow(shown)
        else:
            axis.imshow(values[0], cmap="gray")
        axis.axis("off")
    else:
        if values.ndim == 1:
            values = values[:, None]
        elif values.ndim > 2:
            values = values.reshape(values.shape[0], -1)
        if values.shape[0] < values.shape[1]:  # (channels, steps) → one line per channel over the steps
            values = values.T
        axis.plot(values, lw=1)
        axis.tick_params(labelsize=7)
    axis.set_title(title, fontsize=8)
    return figure_uri(figure)
