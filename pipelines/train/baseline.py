"""The baselines trained beside every run: does the deep model beat the plain ones on this data?

A preset tuned for one dataset can be worse than a two-layer MLP on another (an augmentation
that helps MNIST-1D destroys a signal that sits at fixed positions), and nothing else in a
run would say so. So every classification run also fits the registry's ``mlp`` on (a sample
of) the same training split, briefly and on the CPU, and compares validation scores. A table
also gets the course's first reference, a scaled linear model (scikit-learn's logistic
regression, or ridge regression for a regression target) on the same encoded columns: a
deep model that does worse than a two-line linear one is not worth serving. ``fluxo run``
warns when the model does not win; the run is tagged ``fluxo.baseline`` (beaten, not beaten, or
worse: below a baseline by more than the validation split's sampling noise), and the promotion
gate refuses a worse one by default (``gate.beat_baselines``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipelines.data.store import Dataset

log = logging.getLogger(__name__)

BASELINE = "mlp"
LINEAR = "linear"
BASELINE_TAG = "fluxo.baseline"
BEATEN, NOT_BEATEN, WORSE = "beaten", "not beaten", "worse"

Encode = Callable[[np.ndarray], torch.Tensor]


@dataclass(frozen=True)
class BaselineScore:
    name: str  # "mlp" or "linear"
    val_score: float  # validation accuracy, or R² for regression
    epochs: int
    samples: int
    seconds: float

    @property
    def title(self) -> str:
        return "MLP" if self.name == BASELINE else self.name


def encoder(spec: dict[str, Any]) -> Encode:
    """The model's own input preprocessing, as flat float features: a table's encoding and scaling
    (models/preprocess.py's TableInput), else the one standardisation of images and sequences."""
    if spec.get("kind") == "table":
        from models.preprocess import TableInput

        table = TableInput(spec["table"]["columns"]).eval()

        def encode_table(x: np.ndarray) -> torch.Tensor:
            with torch.no_grad():
                return table(torch.from_numpy(np.array(x, dtype=np.float32)))

        return encode_table
    from models.preprocess import Standardized

    scaling = Standardized(torch.nn.Identity(), spec["mean"], spec["std"])

    def encode(x: np.ndarray) -> torch.Tensor:
        values = torch.from_numpy(np.array(x, dtype=np.float32))  # a copy: x may be a read-only memory map
        with torch.no_grad():
            return scaling(values).reshape(len(values), -1)

    return encode


def fit_baseline(dataset: Dataset, spec: dict[str, Any], seed: int, epochs: int, max_samples: int = 20_000,
                 batch_size: int = 128, learning_rate: float = 1e-3) -> BaselineScore:
    """The default-width MLP, Adam, no augmentation, ``epochs`` passes over at most ``max_samples`` rows."""
    from models import build_model

    started = time.perf_counter()
    encode = encoder(spec)
    train, val = dataset.splits["train"], dataset.splits["val"]
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(train.y), min(max_samples, len(train.y)), replace=False))
    x, y = encode(train.x[rows]), torch.as_tensor(np.asarray(train.y)[rows], dtype=torch.long)
    classes = len(dataset.labels)
    with torch.random.fork_rng(devices=[]):  # the run's own random state is left as it was
        torch.manual_seed(seed)
        model = build_model(BASELINE, (x.shape[1],), classes)
        optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            for batch in torch.randperm(len(x), generator=generator).split(batch_size):
                optimizer.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for start in range(0, len(val.y), 4096):
                logits = model(encode(val.x[start:start + 4096]))
                correct += int((logits.argmax(1).numpy() == np.asarray(val.y[start:start + 4096])).sum())
    return BaselineScore(BASELINE, correct / max(len(val.y), 1), epochs, len(rows), time.perf_counter() - started)


def fit_linear(dataset: Dataset, spec: dict[str, Any], seed: int, max_samples: int = 100_000) -> BaselineScore:
    """Logistic regression (classification) or ridge regression on the encoded, scaled columns.

    scikit-learn's defaults (L2, C=1 or alpha=1): the reference a user would write in two lines
    after scaling, fitted on the training split (at most ``max_samples`` rows), scored on validation.
    """
    from sklearn.linear_model import LogisticRegression, Ridge

    started = time.perf_counter()
    encode = encoder(spec)
    train, val = dataset.splits["train"], dataset.splits["val"]
    rows = np.sort(np.random.default_rng(seed).choice(len(train.y), min(max_samples, len(train.y)), replace=False))
    x, y = encode(train.x[rows]).numpy(), np.asarray(train.y)[rows]
    val_x, val_y = encode(val.x).numpy(), np.asarray(val.y)
    if dataset.task == "regression":
        model = Ridge().fit(x, y)
        score = float(model.score(val_x, val_y)) if len(val_y) > 1 else float("nan")
    else:
        if len(np.unique(y)) < 2:
            return BaselineScore(LINEAR, float("nan"), 0, len(rows), time.perf_counter() - started)
        model = LogisticRegression(max_iter=2000, random_state=seed).fit(x, y)
        score = float((model.predict(val_x) == val_y).mean()) if len(val_y) else float("nan")
    return BaselineScore(LINEAR, score, 1, len(rows), time.perf_counter() - started)


def noise(metric: str, model_score: float, baseline_score: float, samples: int) -> float:
    """How far below a baseline a model may score on validation before it counts as worse.

    Two standard errors of the difference of two accuracies on ``samples`` rows (64 validation
    images: 1 - 0.969 is noise, not a verdict), at least ``MIN_TOLERANCE``; R² gets the fixed
    ``R2_TOLERANCE`` (its spread has no closed form this simple).
    """
    if metric != "accuracy":
        return R2_TOLERANCE
    spread = (model_score * (1 - model_score) + baseline_score * (1 - baseline_score)) / max(samples, 1)
    return max(MIN_TOLERANCE, 2 * math.sqrt(max(spread, 0.0)))


MIN_TOLERANCE = 0.005
R2_TOLERANCE = 0.02


def compare(model_name: str, model_score: float, baselines: list[BaselineScore], metric: str, samples: int) -> str:
    """Log the validation scores and return the verdict: ``beaten``, ``not beaten`` (a tie or within the
    sampling noise of ``samples`` validation rows: warned) or ``worse`` (below a baseline by more than
    the noise: warned, and the gate refuses it by default)."""
    listed = ", ".join(f"{b.title} baseline {b.val_score:.4f} ({b.seconds:.1f} s)" for b in baselines)
    missed = [b for b in baselines if not model_score > b.val_score]
    if not missed:
        log.info("%s: validation %s %.4f; %s", model_name, metric, model_score, listed)
        return BEATEN
    worse = [b for b in missed if model_score < b.val_score - noise(metric, model_score, b.val_score, samples)]
    names = " and ".join(f"the {b.title} baseline ({b.val_score:.4f})" for b in missed)
    consequence = ("it is worse beyond the validation split's noise, so the gate will not promote it "
                   "(gate.beat_baselines)" if worse else "within the validation split's noise, so the gate lets it through")
    log.warning(
        "%s does not beat %s on this data: validation %s %.4f; %s. Try --set model.name=%s, another model "
        "(`fluxo models`), `fluxo run --auto`, the preset without its augment section (augmentation that suits one "
        "dataset can hurt another), or `fluxo tune`",
        model_name, names, metric, model_score, consequence, missed[0].name,
    )
    return WORSE if worse else NOT_BEATEN
