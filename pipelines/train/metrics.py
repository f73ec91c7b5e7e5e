"""Test metrics and the plots a person reads in the MLflow UI."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: training runs on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support  # noqa: E402


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1 and the confusion matrix (rows: true, columns: predicted)."""
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(num_classes)), average="macro", zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision_macro": float(precision),
        "recall_macro": float(recall),
        "f1_macro": float(f1),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=list(range(num_classes))),
    }


def per_class_table(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Precision, recall, F1 and support per class: where a macro average hides a weak class."""
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(labels))), average=None, zero_division=0
    )
    return {
        "columns": ["label", "precision", "recall", "f1", "support"],
        "rows": [
            [label, round(float(p), 4), round(float(r), 4), round(float(f), 4), int(n)]
            for label, p, r, f, n in zip(labels, precision, recall, f1, support)
        ],
    }


def confusion_matrix_figure(matrix: np.ndarray, labels: list[str], title: str) -> plt.Figure:
    """Counts in each cell, darker for more; the diagonal is what the model got right."""
    size = max(4.0, 0.45 * len(labels) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(labels)), labels)
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, col), count in np.ndenumerate(matrix):
        axes.text(col, row, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    figure.tight_layout()
    return figure


def learning_curves_figure(history: list[dict[str, float]]) -> plt.Figure:
    """Train and validation loss and accuracy per epoch, side by side."""
    epochs = [h["epoch"] for h in history]
    figure, (loss_axes, acc_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val"):
        loss_axes.plot(epochs, [h[f"{split}_loss"] for h in history], marker="o", label=split)
        acc_axes.plot(epochs, [h[f"{split}_accuracy"] for h in history], marker="o", label=split)
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    acc_axes.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    loss_axes.legend()
    acc_axes.legend()
    figure.tight_layout()
    return figure
