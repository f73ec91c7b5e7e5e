"""The MLP baseline trained beside every run: does the deep model beat the plain one on this data?

A preset tuned for one dataset can be worse than a two-layer MLP on another (an augmentation
that helps MNIST-1D destroys a signal that sits at fixed positions), and nothing else in a
run would say so. So every classification run also fits the registry's ``mlp`` on (a sample
of) the same training split, briefly and on the CPU, and compares validation accuracies;
``fluxo run`` warns when the model does not win. The first habit of the course material
fluxo follows: a baseline first, then the deep model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.data.store import Dataset

log = logging.getLogger(__name__)

BASELINE = "mlp"


@dataclass(frozen=True)
class BaselineScore:
    val_accuracy: float
    epochs: int
    samples: int
    seconds: float


def _flat(x: np.ndarray, mean: float, std: float) -> torch.Tensor:
    values = torch.from_numpy(np.array(x, dtype=np.float32))  # a copy: x may be a read-only memory map
    return ((values - mean) / (std or 1.0)).reshape(len(values), -1)


def fit_baseline(dataset: Dataset, mean: float, std: float, seed: int, epochs: int, max_samples: int = 20_000,
                 batch_size: int = 128, learning_rate: float = 1e-3) -> BaselineScore:
    """The default-width MLP, Adam, no augmentation, ``epochs`` passes over at most ``max_samples`` rows."""
    from models import build_model

    started = time.perf_counter()
    train, val = dataset.splits["train"], dataset.splits["val"]
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(train.y), min(max_samples, len(train.y)), replace=False))
    x, y = _flat(train.x[rows], mean, std), torch.as_tensor(np.asarray(train.y)[rows], dtype=torch.long)
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
                logits = model(_flat(val.x[start:start + 4096], mean, std))
                correct += int((logits.argmax(1).numpy() == np.asarray(val.y[start:start + 4096])).sum())
    return BaselineScore(correct / max(len(val.y), 1), epochs, len(rows), time.perf_counter() - started)


def compare(model_name: str, model_val_accuracy: float, baseline: BaselineScore, margin: float = 0.0) -> bool:
    """Log the two validation accuracies; warn, with what to try, when the model does not beat the baseline."""
    beaten = model_val_accuracy > baseline.val_accuracy + margin
    if beaten:
        log.info("%s: validation accuracy %.4f, MLP baseline %.4f (%d epochs on %d samples, %.1f s)",
                 model_name, model_val_accuracy, baseline.val_accuracy, baseline.epochs, baseline.samples,
                 baseline.seconds)
    else:
        log.warning(
            "%s does not beat the MLP baseline on this data: validation accuracy %.4f vs %.4f. Try "
            "--set model.name=mlp, another model (`fluxo models`), the preset without its augment section "
            "(augmentation that suits one dataset can hurt another), or `fluxo tune`",
            model_name, model_val_accuracy, baseline.val_accuracy,
        )
    return beaten
