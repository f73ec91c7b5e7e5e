"""The promotion gate: candidate and champion scored as served, on the candidate's test split.

A model's own test score says how it did on the split it was trained beside; after new
data arrives the champion's number comes from another test set, and a variable-length RNN
scores lower served (padded) than trained. So both exported graphs run through ONNX
Runtime on the same samples, the ones the candidate's run held out, and the decision is
made on those numbers. A candidate that passed parity but not the gate becomes the
``challenger``: servers can run it as shadow or canary beside the champion.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.data.store import Dataset
from serving.scoring import onnx_logits
from pipelines.settings import GateSettings

log = logging.getLogger(__name__)

GATE_TAG = "fluxo.gate"


@dataclass(frozen=True)
class ServedScore:
    """Test metrics of one exported graph as the service runs it."""

    version: str
    metrics: dict[str, float]
    class_recall: list[float]
    samples: int


def served_score(onnx_path: Path, dataset: Dataset, version: str) -> ServedScore:
    """Accuracy, macro precision/recall/F1 and per-class recall of the graph on the test split;
    for a regression target R², MAE and RMSE."""
    from sklearn.metrics import (
        accuracy_score, mean_absolute_error, mean_squared_error, precision_recall_fscore_support, r2_score,
    )

    test = dataset.splits["test"]
    truth = np.asarray(test.y)
    outputs = onnx_logits(onnx_path, test.x, lengths=test.lengths)  # lengths: only a graph that takes them
    if dataset.task == "regression":
        values = outputs.reshape(len(truth), -1)[:, 0].astype(np.float64)
        metrics = {"r2": float(r2_score(truth, values)) if len(truth) > 1 else float("nan"),
                   "mae": float(mean_absolute_error(truth, values)),
                   "rmse": float(np.sqrt(mean_squared_error(truth, values)))}
        return ServedScore(version, metrics, [], len(truth))
    predicted = outputs.argmax(1)
    classes = list(range(len(dataset.labels)))
    precision, recall, f1, _ = precision_recall_fscore_support(truth, predicted, labels=classes, average="macro",
                                                               zero_division=0)
    _, per_class, _, _ = precision_recall_fscore_support(truth, predicted, labels=classes, average=None,
                                                         zero_division=0)
    metrics = {"accuracy": float(accuracy_score(truth, predicted)), "precision_macro": float(precision),
               "recall_macro": float(recall), "f1_macro": float(f1)}
    return ServedScore(version, metrics, [float(r) for r in per_class], len(truth))


@dataclass(frozen=True)
class GateDecision:
    """What the gate saw and decided; logged on both versions and the candidate's run."""

    candidate: ServedScore
    champion: ServedScore | None
    metric: str
    promoted: bool
    reasons: list[str] = field(default_factory=list)  # why not, one per failed condition
    data_version: str | None = None

    @property
    def value(self) -> float:
        return self.candidate.metrics[self.metric]

    @property
    def champion_value(self) -> float | None:
        return None if self.champion is None else self.champion.metrics[self.metric]

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "promoted": self.promoted,
            "reasons": self.reasons,
            "data_version": self.data_version,
            "candidate": asdict(self.candidate),
            "champion": asdict(self.champion) if self.champion else None,
        }

    def as_tag(self) -> str:
        """The decision without per-class numbers: MLflow tags hold at most 8,000 characters."""
        short = {k: v for k, v in self.as_dict().items() if k not in ("candidate", "champion")}
        short["candidate"] = {"version": self.candidate.version, self.metric: self.value}
        if self.champion is not None:
            short["champion"] = {"version": self.champion.version, self.metric: self.champion_value}
        return json.dumps(short)


@dataclass(frozen=True)
class BaselineVerdict:
    """What the candidate's run found against the baselines it trained beside (pipelines/train/baseline.py)."""

    worse: bool  # below a baseline by more than the validation split's noise
    model: float | None  # the model's best validation score
    baselines: dict[str, float]  # baseline name → its validation score
    metric: str  # accuracy or r2

    @classmethod
    def of_run(cls, tags: dict[str, str], metrics: dict[str, float]) -> BaselineVerdict | None:
        """From the run's ``fluxo.baseline`` tag and metrics; None when no baseline was trained."""
        from pipelines.train.baseline import BASELINE_TAG, WORSE

        verdict = tags.get(BASELINE_TAG)
        if verdict is None:
            return None
        metric = "r2" if "best_val_r2" in metrics else "accuracy"
        scores = {name: metrics[f"{name}_val_{metric}"] for name in ("baseline", "linear")
                  if f"{name}_val_{metric}" in metrics}
        return cls(verdict == WORSE, metrics.get(f"best_val_{metric}"), scores, metric)

    def reason(self) -> str:
        shown = ", ".join(f"{'mlp' if name == 'baseline' else name} {score:.4f}" for name, score in self.baselines.items())
        model = f"{self.model:.4f}" if self.model is not None else "?"
        return (f"the model is worse than a baseline its run trained beside it, beyond the validation split's noise "
                f"(validation {self.metric} {model}; {shown}): gate.beat_baselines=true")


def decide(candidate: ServedScore, champion: ServedScore | None, gate: GateSettings,
           data_version: str | None = None, baselines: BaselineVerdict | None = None) -> GateDecision:
    """Apply the gate's conditions; every failed one is named, with its setting."""
    metric, reasons = gate.metric_for("regression" if "r2" in candidate.metrics else "classification"), []
    lower = metric in gate.LOWER_IS_BETTER  # mae, rmse: a smaller error wins
    value = candidate.metrics[metric]
    if gate.beat_baselines and baselines is not None and baselines.worse:
        reasons.append(baselines.reason())
    if gate.min_value is not None and (value > gate.min_value if lower else value < gate.min_value):
        reasons.append(f"served {metric} {value:.4f} {'>' if lower else '<'} gate.min_value={gate.min_value}")
    if champion is not None:
        theirs = champion.metrics[metric]
        gain = theirs - value if lower else value - theirs
        if gain < gate.min_improvement:
            reasons.append(
                f"served {metric} {value:.4f} vs champion v{champion.version} {theirs:.4f} on the same test split: "
                f"improvement {gain:+.4f} < gate.min_improvement={gate.min_improvement}"
            )
        if gate.max_class_regression is not None and candidate.class_recall and champion.class_recall:
            drops = [(i, old - new) for i, (new, old) in enumerate(zip(candidate.class_recall, champion.class_recall))]
            worst, drop = max(drops, key=lambda item: item[1])
            if drop > gate.max_class_regression:
                reasons.append(
                    f"class {worst} recall fell by {drop:.4f} against champion v{champion.version} "
                    f"> gate.max_class_regression={gate.max_class_regression}"
                )
    return GateDecision(candidate, champion, metric, not reasons, reasons, data_version)
