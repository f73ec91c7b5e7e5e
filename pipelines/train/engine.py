"""The training engine: fit with early stopping on validation loss, keep the best weights.

Batches come from ``pipelines.train.batches``: resident tensors on the device when
the data fits (each step is a slice, not a DataLoader round trip), streamed shards
when it does not. The loop synchronises with the device once per epoch.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipelines.train.batches import Batch, ResidentBatches, StreamingBatches
from pipelines.train.tracker import NullTracker, Tracker

Batches = ResidentBatches | StreamingBatches

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when a GPU is present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available; use train.device=auto")
    return torch.device(name)


class ClassificationStep:
    """Loss and metrics of one batch for multi-class classification, in one place.

    Targets are class indices, or class probabilities when mixup/cutmix blended samples.
    """

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hard = targets.argmax(dim=1) if targets.ndim == 2 else targets
        return (logits.argmax(dim=1) == hard).sum()


Augment = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class FitConfig:
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    patience: int
    seed: int
    monitor: str = "val_loss"  # or "val_accuracy": which validation number early stopping follows


@dataclass
class FitResult:
    best_epoch: int
    best_val_loss: float  # validation loss at the best epoch
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    samples_per_second: float = 0.0
    stopped_early: bool = False


def forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Variable-length sequences pass their lengths; everything else only x."""
    return model(batch.x) if batch.lengths is None else model(batch.x, lengths=batch.lengths)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, step: ClassificationStep) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Mean loss, accuracy, all logits and all targets over a split, in eval mode."""
    model.eval()
    logits, targets = [], []
    for batch in batches.chunks():
        logits.append(forward(model, batch))
        targets.append(batch.y)
    all_logits, all_targets = torch.cat(logits), torch.cat(targets)
    loss = step.loss(all_logits, all_targets) if len(all_targets) else torch.tensor(0.0)
    accuracy = step.correct(all_logits, all_targets).float() / max(len(all_targets), 1)
    return float(loss), float(accuracy), all_logits, all_targets


def fit(
    model: nn.Module,
    train: Batches,
    val: Batches,
    config: FitConfig,
    tracker: Tracker | None = None,
    on_best: Callable[[nn.Module, int], None] | None = None,
    step: ClassificationStep | None = None,
    augment: Augment | None = None,
) -> FitResult:
    """Train with Adam until the monitored validation number stops improving for ``patience`` epochs.

    The model is left holding the best epoch's weights. ``on_best`` is called
    each time the monitored number improves (the caller writes the checkpoint).
    ``augment`` transforms training batches only, on the device.
    """
    tracker = tracker or NullTracker()
    step = step or ClassificationStep()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    # Both monitors are turned into "lower is better" so one comparison serves them.
    sign = -1.0 if config.monitor == "val_accuracy" else 1.0
    best_score, best_loss, best_epoch, best_state, stale = float("inf"), float("inf"), 0, None, 0
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    seen = 0
    device = next(model.parameters()).device
    progress = tqdm(range(1, config.epochs + 1), desc="train", unit="epoch", leave=False, disable=None)
    for epoch in progress:
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        count = 0
        for batch in train.epoch():
            if augment is not None:
                batch = Batch(*augment(batch.x, batch.y), batch.lengths)
            logits = forward(model, batch)
            loss = step.loss(logits, batch.y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(batch.y)
            correct += step.correct(logits.detach(), batch.y)
            count += len(batch.y)
        seen += count
        val_loss, val_accuracy, _, _ = evaluate(model, val, step)
        record = {
            "epoch": epoch,
            "train_loss": float(loss_sum) / max(count, 1),
            "train_accuracy": float(correct) / max(count, 1),
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
        }
        history.append(record)
        tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
        progress.set_postfix(loss=f"{record['train_loss']:.4f}", val_loss=f"{val_loss:.4f}", val_acc=f"{val_accuracy:.3f}")
        score = sign * record[config.monitor]
        if score < best_score:
            best_score, best_loss, best_epoch, stale = score, val_loss, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
            if on_best is not None:
                on_best(model, epoch)
        else:
            stale += 1
            if stale >= config.patience:
                log.info("early stop at epoch %d: no %s improvement for %d epochs", epoch, config.monitor, stale)
                break
    progress.close()
    seconds = time.perf_counter() - started
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(
        best_epoch=best_epoch,
        best_val_loss=best_loss,
        epochs_run=len(history),
        history=history,
        seconds=seconds,
        samples_per_second=seen / seconds if seconds > 0 else 0.0,
        stopped_early=len(history) < config.epochs,
    )


def seed_everything(seed: int) -> None:
    """Same seed, same weights and batch order (on the CPU, bit for bit)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


__all__ = ["ClassificationStep", "FitConfig", "FitResult", "evaluate", "fit", "forward", "resolve_device", "seed_everything"]
