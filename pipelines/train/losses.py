"""Task heads by name: the loss, the prediction rule and the metrics of one kind of target.

A model only emits logits; what they mean depends on the task. Keeping loss,
prediction and metrics for a task in one object lets the training loop stay
task-agnostic and guarantees the three agree (e.g. a binary net trained with
BCE-with-logits is thresholded on the sigmoid, not on argmax).

- ``multiclass``: one of K classes. Softmax + cross-entropy; targets are class
  indices or probability rows (soft labels from mixup or distillation).
- ``binary``: one logit per sample, sigmoid + BCE-with-logits.
- ``multilabel``: K independent yes/no labels, one sigmoid + BCE each.
- ``regression``: linear outputs with MSE, MAE (L1) or Huber loss.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

from pipelines.errors import FluxoError


class TaskSettingError(FluxoError, ValueError):
    """A bad task name or option: a FluxoError for the CLI, a ValueError for callers."""


ArrayLike = np.ndarray | torch.Tensor


def _numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _is_scores(outputs: np.ndarray) -> bool:
    """Float outputs are scores (probabilities); integer or bool outputs are hard predictions."""
    return np.issubdtype(outputs.dtype, np.floating)


def _check_probabilities(task: str, scores: np.ndarray) -> None:
    # Logits passed by mistake would be thresholded at 0.5 instead of 0 and give wrong metrics.
    if scores.size and (scores.min() < 0 or scores.max() > 1):
        raise TaskSettingError(
            f"{task} metrics: float outputs must be probabilities in [0, 1]; "
            "pass task.scores(logits) or task.predict(logits), not raw logits"
        )


class Task(ABC):
    """What one kind of target needs from training: a loss, a prediction rule and metrics."""

    name: ClassVar[str]
    target_dtype: ClassVar[torch.dtype] = torch.float32  # what the data loader should hand ``loss``

    def num_outputs(self, num_classes: int) -> int:
        """Width of the model's last layer for ``num_classes`` classes, labels or regression targets."""
        return num_classes

    @abstractmethod
    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch; differentiable in ``logits``."""

    @abstractmethod
    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities (classification) or predicted values (regression)."""

    @abstractmethod
    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Hard predictions: class indices, 0/1 labels or values."""

    @abstractmethod
    def metrics(self, y_true: ArrayLike, outputs: ArrayLike) -> dict[str, float]:
        """Metrics over a whole split; ``outputs`` are ``scores`` (floats) or ``predict`` results (ints).

        Scores give more: threshold-free metrics such as ROC-AUC need them.
        """

    def options(self) -> dict[str, Any]:
        """The task's settings, for logging with the run."""
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}


@dataclass(frozen=True)
class MulticlassTask(Task):
    """Softmax + cross-entropy, with optional label smoothing.

    Label smoothing moves ``label_smoothing`` of each target's mass to the other
    classes, which stops the net from chasing infinite logits on easy samples
    and usually calibrates it better. ``num_classes`` fixes the label set the
    macro metrics average over, so a class missing from a split still counts.
    """

    label_smoothing: float = 0.0
    num_classes: int | None = None

    name: ClassVar[str] = "multiclass"
    target_dtype: ClassVar[torch.dtype] = torch.long

    def __post_init__(self) -> None:
        if not 0 <= self.label_smoothing < 1:
            raise TaskSettingError(f"multiclass: label_smoothing must lie in [0, 1), got {self.label_smoothing}")

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.ndim == logits.ndim:  # probability rows: soft labels
            return F.cross_entropy(logits, targets.to(logits.dtype), label_smoothing=self.label_smoothing)
        return F.cross_entropy(logits, targets.long(), label_smoothing=self.label_smoothing)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=1)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=1)

    def metrics(self, y_true: ArrayLike, outputs: ArrayLike) -> dict[str, float]:
        truth, out = _numpy(y_true), _numpy(outputs)
        truth = truth.argmax(axis=1) if truth.ndim == 2 else truth.astype(np.int64)
        predicted = out.argmax(axis=1) if out.ndim == 2 else out.astype(np.int64)
        labels = list(range(self.num_classes)) if self.num_classes else None
        precision, recall, f1, _ = skm.precision_recall_fscore_support(
            truth, predicted, labels=labels, average="macro", zero_division=0
        )
        return {
            "accuracy": float(skm.accuracy_score(truth, predicted)),
            "precision_macro": float(precision),
            "recall_macro": float(recall),
            "f1_macro": float(f1),
        }


@dataclass(frozen=True)
class BinaryTask(Task):
    """One logit, sigmoid + BCE-with-logits (numerically stable, unlike sigmoid then BCE).

    ``pos_weight`` > 1 makes a missed positive cost more, the usual answer to a
    rare positive class; ``threshold`` is the probability above which we say 1.
    """

    pos_weight: float | None = None
    threshold: float = 0.5

    name: ClassVar[str] = "binary"

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise TaskSettingError(f"binary: threshold must lie in (0, 1), got {self.threshold}")
        if self.pos_weight is not None and self.pos_weight <= 0:
            raise TaskSettingError(f"binary: pos_weight must be > 0, got {self.pos_weight}")

    def num_outputs(self, num_classes: int) -> int:
        return 1

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos_weight = None
        if self.pos_weight is not None:
            pos_weight = torch.tensor(self.pos_weight, dtype=logits.dtype, device=logits.device)
        return F.binary_cross_entropy_with_logits(
            logits.reshape(-1), targets.reshape(-1).to(logits.dtype), pos_weight=pos_weight
        )

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.reshape(-1).sigmoid()

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return (self.scores(logits) >= self.threshold).long()

    def metrics(self, y_true: ArrayLike, outputs: ArrayLike) -> dict[str, float]:
        truth, out = _numpy(y_true).reshape(-1).astype(np.int64), _numpy(outputs).reshape(-1)
        scored = _is_scores(out)
        if scored:
            _check_probabilities("binary", out)
        predicted = (out >= self.threshold).astype(np.int64) if scored else out.astype(np.int64)
        precision, recall, f1, _ = skm.precision_recall_fscore_support(
            truth, predicted, average="binary", zero_division=0
        )
        result = {
            "accuracy": float(skm.accuracy_score(truth, predicted)),
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
        }
        if scored and len(np.unique(truth)) == 2:  # AUC is undefined with one class present
            result["roc_auc"] = float(skm.roc_auc_score(truth, out))
        return result


@dataclass(frozen=True)
class MultilabelTask(Task):
    """K independent yes/no labels: one sigmoid + BCE-with-logits per label.

    ``accuracy`` is exact match (every label right), strict by design;
    ``hamming_accuracy`` is the share of single labels right.
    """

    pos_weight: tuple[float, ...] | None = None
    threshold: float = 0.5

    name: ClassVar[str] = "multilabel"

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise TaskSettingError(f"multilabel: threshold must lie in (0, 1), got {self.threshold}")
        if self.pos_weight is not None:
            object.__setattr__(self, "pos_weight", tuple(float(w) for w in self.pos_weight))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos_weight = None
        if self.pos_weight is not None:
            if len(self.pos_weight) != logits.shape[1]:
                raise TaskSettingError(
                    f"multilabel: pos_weight has {len(self.pos_weight)} entries, the model {logits.shape[1]} labels"
                )
            pos_weight = torch.tensor(self.pos_weight, dtype=logits.dtype, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), pos_weight=pos_weight)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid()

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits.sigmoid() >= self.threshold).long()

    def metrics(self, y_true: ArrayLike, outputs: ArrayLike) -> dict[str, float]:
        truth, out = _numpy(y_true).astype(np.int64), _numpy(outputs)
        scored = _is_scores(out)
        if scored:
            _check_probabilities("multilabel", out)
        predicted = (out >= self.threshold).astype(np.int64) if scored else out.astype(np.int64)
        result = {
            "accuracy": float(skm.accuracy_score(truth, predicted)),
            "hamming_accuracy": float(1.0 - skm.hamming_loss(truth, predicted)),
            "f1_micro": float(skm.f1_score(truth, predicted, average="micro", zero_division=0)),
            "f1_macro": float(skm.f1_score(truth, predicted, average="macro", zero_division=0)),
        }
        if scored:
            # Macro AUC over the labels where it is defined (both classes present).
            both = [k for k in range(truth.shape[1]) if len(np.unique(truth[:, k])) == 2]
            if both:
                result["roc_auc_macro"] = float(np.mean([skm.roc_auc_score(truth[:, k], out[:, k]) for k in both]))
        return result


_CRITERIA = ("mse", "mae", "huber")


@dataclass(frozen=True)
class RegressionTask(Task):
    """Linear outputs, one per target, fitted with ``criterion``.

    MSE is the default and matches R²; MAE (L1) and Huber are less swayed by
    outliers, Huber staying quadratic (smooth) within ``huber_delta`` of the target.
    """

    criterion: str = "mse"
    huber_delta: float = 1.0

    name: ClassVar[str] = "regression"

    def __post_init__(self) -> None:
        if self.criterion not in _CRITERIA:
            raise TaskSettingError(f"regression: criterion {self.criterion!r} is not one of {', '.join(_CRITERIA)}")
        if self.huber_delta <= 0:
            raise TaskSettingError(f"regression: huber_delta must be > 0, got {self.huber_delta}")

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        values, targets = self.predict(logits), targets.to(logits.dtype)
        if values.shape != targets.shape:
            # Broadcasting (B,) against (B, 1) would silently average a B×B matrix of errors.
            raise ValueError(f"regression: outputs {tuple(values.shape)} and targets {tuple(targets.shape)} differ")
        if self.criterion == "mse":
            return F.mse_loss(values, targets)
        if self.criterion == "mae":
            return F.l1_loss(values, targets)
        return F.huber_loss(values, targets, delta=self.huber_delta)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return self.predict(logits)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        # A single-target head emits (B, 1); targets come as (B,).
        return logits.squeeze(-1) if logits.ndim == 2 and logits.shape[1] == 1 else logits

    def metrics(self, y_true: ArrayLike, outputs: ArrayLike) -> dict[str, float]:
        truth, predicted = _numpy(y_true).astype(np.float64), _numpy(outputs).astype(np.float64)
        predicted = predicted.reshape(truth.shape)
        mse = float(skm.mean_squared_error(truth, predicted))
        return {
            "r2": float(skm.r2_score(truth, predicted)) if len(truth) > 1 else math.nan,
            "mse": mse,
            "rmse": math.sqrt(mse),
            "mae": float(skm.mean_absolute_error(truth, predicted)),
        }


TASKS: dict[str, type[Task]] = {
    task.name: task for task in (MulticlassTask, BinaryTask, MultilabelTask, RegressionTask)
}


def build_task(name: str, **options: Any) -> Task:
    """The task ``name`` with ``options``; unknown names and options fail listing what is accepted."""
    key = name.lower()
    if key not in TASKS:
        raise TaskSettingError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    cls = TASKS[key]
    accepted = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TaskSettingError(
            f"task {key}: unknown option(s) {', '.join(unknown)}; it accepts {', '.join(accepted) or 'no options'}"
        )
    return cls(**options)


__all__ = [
    "TASKS",
    "BinaryTask",
    "MulticlassTask",
    "MultilabelTask",
    "RegressionTask",
    "Task",
    "TaskSettingError",
    "build_task",
]
