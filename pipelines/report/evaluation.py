"""The numbers of a model report: served predictions on the test split, with their uncertainty.

Everything here works on what the service would answer (probabilities from the ONNX graph),
so the report describes the model as clients meet it, not as it looked inside PyTorch.
A regression model's answers are values in the target's units (:class:`RegressionEvaluation`):
MAE, RMSE and R², with the same bootstrap.
Confidence intervals come from a percentile bootstrap over test samples: a test split of
a few hundred images moves accuracy by several points, and a reader comparing two
versions needs to see that before reading meaning into a 0.5-point gap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro")
REGRESSION_METRICS = ("mae", "rmse", "r2")
LOWER_IS_BETTER = frozenset({"mae", "rmse"})


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float


@dataclass(frozen=True)
class Calibration:
    """Expected calibration error over equal-width confidence bins, and the bins for a reliability diagram."""

    ece: float
    bin_edges: list[float]
    bin_accuracy: list[float | None]  # None: no sample's confidence fell in the bin
    bin_confidence: list[float | None]
    bin_count: list[int]


@dataclass(frozen=True)
class Evaluation:
    """One graph's answers on the test split and what they add up to."""

    truth: np.ndarray
    probabilities: np.ndarray
    metrics: dict[str, Interval]
    per_class: list[dict[str, float]]  # precision, recall, f1, support per label index
    confusion: np.ndarray
    calibration: Calibration

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(1)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def confusion_matrices(truth: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """Confusion counts (rows: truth, columns: predicted); a leading axis for stacked resamples."""
    truth, predicted = np.atleast_2d(truth), np.atleast_2d(predicted)
    codes = truth * classes + predicted + (np.arange(len(truth))[:, None] * classes * classes)
    counts = np.bincount(codes.ravel(), minlength=len(truth) * classes * classes)
    return counts.reshape(len(truth), classes, classes)


def scores_from_confusion(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy and macro precision/recall/F1 of each matrix, as scikit-learn with ``zero_division=0``."""
    tp = np.diagonal(confusion, axis1=-2, axis2=-1).astype(np.float64)
    predicted = confusion.sum(axis=-2)
    actual = confusion.sum(axis=-1)
    total = confusion.sum(axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(actual > 0, tp / actual, 0.0)
        f1 = np.where(predicted + actual > 0, 2 * tp / (predicted + actual), 0.0)
    return {"accuracy": tp.sum(-1) / np.maximum(total, 1), "precision_macro": precision.mean(-1),
            "recall_macro": recall.mean(-1), "f1_macro": f1.mean(-1)}


def bootstrap_intervals(truth: np.ndarray, predicted: np.ndarray, classes: int, resamples: int = 1000,
                        level: float = 0.95, seed: int = 0) -> dict[str, Interval]:
    """Point value and percentile-bootstrap interval of every metric in :data:`METRICS`."""
    point = scores_from_confusion(confusion_matrices(truth, predicted, classes)[0])
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // max(len(truth), 1))  # resamples at a time: bounded memory on a large test split
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, resamples, chunk):
        rows = rng.integers(0, len(truth), size=(min(chunk, resamples - start), len(truth)))
        parts.append(scores_from_confusion(confusion_matrices(truth[rows], predicted[rows], classes)))
    resampled = {name: np.concatenate([part[name] for part in parts]) for name in METRICS}
    tail = (1 - level) / 2 * 100
    return {name: Interval(float(point[name]), float(np.percentile(resampled[name], tail)),
                           float(np.percentile(resampled[name], 100 - tail))) for name in METRICS}


def calibration(truth: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> Calibration:
    """ECE = Σ_bins (share of samples) × |accuracy − mean confidence|, on the top-label confidence."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == truth
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    accuracy, mean_confidence, count, ece = [], [], [], 0.0
    for b in range(bins):
        members = index == b
        n = int(members.sum())
        count.append(n)
        if n == 0:
            accuracy.append(None)
            mean_confidence.append(None)
            continue
        acc, conf = float(correct[members].mean()), float(confidence[members].mean())
        accuracy.append(acc)
        mean_confidence.append(conf)
        ece += n / len(truth) * abs(acc - conf)
    return Calibration(float(ece), [float(e) for e in edges], accuracy, mean_confidence, count)


def evaluate(truth: np.ndarray, probabilities: np.ndarray, classes: int, seed: int = 0) -> Evaluation:
    truth = np.asarray(truth, dtype=np.int64)
    predicted = probabilities.argmax(1)
    confusion = confusion_matrices(truth, predicted, classes)[0]
    tp = np.diagonal(confusion).astype(np.float64)
    per_class = []
    for c in range(classes):
        precision = tp[c] / confusion[:, c].sum() if confusion[:, c].sum() else 0.0
        recall = tp[c] / confusion[c].sum() if confusion[c].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"precision": float(precision), "recall": float(recall), "f1": float(f1),
                          "support": int(confusion[c].sum())})
    return Evaluation(truth, probabilities, bootstrap_intervals(truth, predicted, classes, seed=seed), per_class,
                      confusion, calibration(truth, probabilities))


@dataclass(frozen=True)
class RegressionEvaluation:
    """A regression graph's answers on the test split: one value per sample, in the target's units."""

    truth: np.ndarray  # float64 (n,)
    values: np.ndarray  # float64 (n,): what the service answers
    metrics: dict[str, Interval]  # mae, rmse, r2

    @property
    def residuals(self) -> np.ndarray:
        """true − predicted: positive where the model answered too low."""
        return self.truth - self.values


def regression_scores(truth: np.ndarray, values: np.ndarray) -> dict[str, np.ndarray]:
    """MAE, RMSE and R² of each row (a leading axis for stacked resamples), as scikit-learn computes them.

    R² of a constant truth is scikit-learn's ``force_finite`` answer: 1 for a perfect fit, else 0.
    """
    truth, values = np.atleast_2d(truth).astype(np.float64), np.atleast_2d(values).astype(np.float64)
    error = truth - values
    residual = (error ** 2).sum(-1)
    total = ((truth - truth.mean(-1, keepdims=True)) ** 2).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(total > 0, 1.0 - residual / total, np.where(residual == 0, 1.0, 0.0))
    return {"mae": np.abs(error).mean(-1), "rmse": np.sqrt((error ** 2).mean(-1)), "r2": r2}


def regression_intervals(truth: np.ndarray, values: np.ndarray, resamples: int = 1000, level: float = 0.95,
                         seed: int = 0) -> dict[str, Interval]:
    """Point value and percentile-bootstrap interval of every metric in :data:`REGRESSION_METRICS`."""
    truth, values = np.asarray(truth, dtype=np.float64), np.asarray(values, dtype=np.float64)
    point = {name: float(v[0]) for name, v in regression_scores(truth, values).items()}
    if len(truth) < 2:  # nothing to resample; R² is undefined on one sample
        point["r2"] = float("nan")
        return {name: Interval(point[name], point[name], point[name]) for name in REGRESSION_METRICS}
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // len(truth))  # resamples at a time: bounded memory on a large test split
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, resamples, chunk):
        rows = rng.integers(0, len(truth), size=(min(chunk, resamples - start), len(truth)))
        parts.append(regression_scores(truth[rows], values[rows]))
    resampled = {name: np.concatenate([part[name] for part in parts]) for name in REGRESSION_METRICS}
    tail = (1 - level) / 2 * 100
    return {name: Interval(point[name], float(np.percentile(resampled[name], tail)),
                           float(np.percentile(resampled[name], 100 - tail))) for name in REGRESSION_METRICS}


def evaluate_regression(truth: np.ndarray, outputs: np.ndarray, seed: int = 0) -> RegressionEvaluation:
    """``outputs``: the graph's (n, 1) answers (or (n,)); the value is the first column."""
    truth = np.asarray(truth, dtype=np.float64).ravel()
    values = np.asarray(outputs, dtype=np.float64).reshape(len(truth), -1)[:, 0]
    return RegressionEvaluation(truth, values, regression_intervals(truth, values, seed=seed))


def largest_errors(evaluation: RegressionEvaluation, limit: int = 8) -> list[int]:
    """Test rows with the largest absolute error, largest first."""
    error = np.abs(evaluation.residuals)
    return [int(i) for i in np.argsort(-error, kind="stable")[:limit]]


def confident_mistakes(evaluation: Evaluation, limit: int = 8) -> list[int]:
    """Test rows the model got wrong, most confident first: where it fails without knowing it."""
    wrong = np.flatnonzero(evaluation.predicted != evaluation.truth)
    confidence = evaluation.probabilities[wrong].max(1)
    return [int(i) for i in wrong[np.argsort(-confidence, kind="stable")][:limit]]


@dataclass(frozen=True)
class Latency:
    batch_size: int
    median_ms: float
    p95_ms: float

    @property
    def instances_per_s(self) -> float:
        return self.batch_size / (self.median_ms / 1000) if self.median_ms > 0 else float("inf")


def measure_latency(onnx_path: Path, x: np.ndarray, batch_size: int, runs: int = 30, warmup: int = 3) -> Latency:
    """Wall time of one ONNX Runtime call (CPU provider, as ``fluxo serve`` runs it without a GPU)."""
    import onnxruntime as ort

    from serving.contract import INPUT_NAME

    from serving.runtime import graph_feeds

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rows = np.resize(np.arange(len(x)), batch_size)  # repeats rows when the split is smaller than the batch
    feeds = graph_feeds(session, INPUT_NAME, np.ascontiguousarray(np.asarray(x[rows], dtype=np.float32)))
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - started) * 1000)
    return Latency(batch_size, float(np.median(times)), float(np.percentile(times, 95)))
