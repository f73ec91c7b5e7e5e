"""The training engine: fit with early stopping on validation loss, keep the best weights.

Batches come from ``pipelines.train.batches``: resident tensors on the device when
the data fits (each step is a slice, not a DataLoader round trip), streamed shards
when it does not. The loop synchronises with the device once per epoch.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from pipelines.train import distributed
from pipelines.train.batches import Batch, ResidentBatches, StreamingBatches
from pipelines.train.checkpoint import restore_rng_states, rng_states, save_state
from pipelines.train.losses import Task, build_task
from pipelines.train.optim import build_optimizer, build_scheduler, clip_gradients, l1_penalty, parameter_groups
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


class TaskStep:
    """Loss and the correct-prediction count of one batch for a task, in one place.

    Multiclass targets are class indices, or class probabilities when mixup/CutMix
    blended samples; regression has no accuracy, so it counts nothing correct.
    """

    def __init__(self, task: Task | None = None) -> None:
        self.task = task or build_task("multiclass")

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.task.loss(logits, targets)

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.task.name == "regression":
            return torch.zeros((), dtype=torch.long, device=logits.device)
        predicted = self.task.predict(logits)
        if self.task.name == "multiclass":
            hard = targets.argmax(dim=1) if targets.ndim == 2 else targets
            return (predicted == hard).sum()
        if self.task.name == "multilabel":
            return (predicted == targets.long()).all(dim=1).sum()
        return (predicted == targets.reshape(-1).long()).sum()


class ClassificationStep(TaskStep):
    """Softmax + cross-entropy: the default task."""


# (x, y, generator, lengths or None) → (x augmented, targets)
Augment = Callable[[torch.Tensor, torch.Tensor, torch.Generator, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class FitConfig:
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    patience: int
    seed: int
    monitor: str = "val_loss"  # or "val_accuracy": which validation number early stopping follows
    optimizer: str = "adam"
    momentum: float = 0.0
    nesterov: bool = False
    scheduler: str = "none"
    scheduler_options: dict = field(default_factory=dict)
    l1: float = 0.0
    clip_norm: float | None = None
    checkpoint_dir: Path | None = None  # resumable state is written here when set
    checkpoint_every: int = 0  # also save every N optimiser steps (0: at epoch ends only)
    keep_last: bool = False  # end with the last epoch's weights instead of the best validation epoch's
    precision: str = "fp32"  # or "bf16": autocast matmuls/convolutions to bfloat16 (GPU tensor cores)
    compile: bool = False  # torch.compile forward/backward and the optimiser step (lr as a tensor)
    compile_mode: str = "default"  # the model's torch.compile mode; reduce-overhead: CUDA graphs


@dataclass
class FitResult:
    best_epoch: int
    best_val_loss: float  # validation loss at the best epoch
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    samples_per_second: float = 0.0
    stopped_early: bool = False


def compiled_step(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """``optimizer.step`` under torch.compile: one fused kernel set instead of a loop over parameters.

    The optimiser must hold its learning rate as a tensor (``build_optimizer(lr_tensor=True)``):
    a float lr is a constant baked into the graph, so every scheduler step would recompile.
    """

    def step() -> None:
        optimizer.step()

    return torch.compile(step, fullgraph=False)


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


def _log_epoch(epoch: int, epochs: int, record: dict[str, float], seconds: float, with_accuracy: bool) -> None:
    """One INFO line per epoch: where there is no progress bar (CI logs, nohup, a Prefect worker)
    it is the only sign that training is alive, and the numbers a bar would show."""
    accuracy = f", val_accuracy {record['val_accuracy']:.4f}" if with_accuracy else ""
    log.info("epoch %d/%d: train_loss %.4f, val_loss %.4f%s (%.1f s)",
             epoch, epochs, record["train_loss"], record["val_loss"], accuracy, seconds)


def fit(
    model: nn.Module,
    train: Batches,
    val: Batches,
    config: FitConfig,
    tracker: Tracker | None = None,
    on_best: Callable[[nn.Module, int], None] | None = None,
    step: ClassificationStep | None = None,
    augment: Augment | None = None,
    resume: dict[str, Any] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    extra_state: dict[str, Any] | None = None,
) -> FitResult:
    """Train until the monitored validation number stops improving for ``patience`` epochs.

    The model is left holding the best epoch's weights. ``on_best`` is called each
    time the monitored number improves (the caller writes the export checkpoint);
    ``on_epoch`` after each epoch's validation (it may raise to stop, e.g. pruning).
    ``augment`` transforms training batches only, on the device.

    With ``config.checkpoint_dir`` the full training state (weights, optimiser,
    scheduler, every RNG, data order, early-stopping counters) is saved atomically at
    each epoch end and every ``checkpoint_every`` steps; passing such a state as
    ``resume`` continues exactly where it stopped, bit for bit on the CPU.
    ``extra_state`` is stored alongside (e.g. the MLflow run id).
    """
    tracker = tracker or NullTracker()
    step = step or ClassificationStep()
    ranks = distributed.current()
    # Training steps go through the DDP wrapper (it all-reduces gradients); everything else,
    # evaluation and state dicts included, uses the plain module, identical on every rank.
    trained = torch.nn.parallel.DistributedDataParallel(model) if ranks.active else model
    if config.compile:
        trained = torch.compile(trained, mode=config.compile_mode)
    params = parameter_groups(model, config.weight_decay)
    optimizer = build_optimizer(
        config.optimizer, params, config.learning_rate, config.weight_decay, config.momentum, config.nesterov,
        lr_tensor=config.compile,
    )
    steps_per_epoch = max(1, -(-len(train) // config.batch_size))
    schedule = build_scheduler(
        config.scheduler, optimizer, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
        compiled=config.compile, **config.scheduler_options,
    )
    optimizer_step = compiled_step(optimizer) if config.compile else optimizer.step
    augment_generator = torch.Generator().manual_seed(config.seed + 1)

    # Both monitors are turned into "lower is better" so one comparison serves them.
    sign = -1.0 if config.monitor == "val_accuracy" else 1.0
    progress_state = {"best_score": float("inf"), "best_loss": float("inf"), "best_epoch": 0, "stale": 0}
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = []
    start_epoch, skip_steps, global_step = 1, 0, 0
    partial = {"loss_sum": 0.0, "correct": 0, "count": 0}
    epoch_order_state = train.rng_state()
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if schedule.scheduler is not None and resume.get("scheduler"):
            schedule.scheduler.load_state_dict(resume["scheduler"])
        augment_generator.set_state(resume["augment_rng"])
        train.set_rng_state(resume["order_rng"])
        epoch_order_state = resume["order_rng"]
        restore_rng_states(resume["rng"])
        progress_state = dict(resume["progress"])
        best_state = resume["best_state"]
        history = list(resume["history"])
        start_epoch, skip_steps, global_step = resume["epoch"], resume["step_in_epoch"], resume["global_step"]
        partial = dict(resume["partial"])
        log.info("resuming at epoch %d, step %d (global step %d)", start_epoch, skip_steps, global_step)

    def snapshot(epoch: int, step_in_epoch: int) -> None:
        if config.checkpoint_dir is None or not ranks.main:
            return
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": schedule.scheduler.state_dict() if schedule.scheduler is not None else None,
            "scaler": None,  # no AMP scaler on this path; the key keeps the format stable
            "augment_rng": augment_generator.get_state(),
            "order_rng": epoch_order_state,
            "rng": rng_states(),
            "progress": progress_state,
            "best_state": best_state,
            "history": history,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "partial": dict(partial),
            **(extra_state or {}),
        }
        save_state(config.checkpoint_dir, global_step, state)

    started = time.perf_counter()
    seen = 0
    device = next(model.parameters()).device
    progress = tqdm(range(start_epoch, config.epochs + 1), desc="train", unit="epoch", leave=False, disable=None)
    # tqdm hides the bar when stderr is not a terminal (disable=None); log lines stand in for it
    # then, from one rank only: every rank holds the same numbers.
    log_epochs = bool(progress.disable) and ranks.main
    with_accuracy = step.task.name != "regression"
    for epoch in progress:
        epoch_started = time.perf_counter()
        if skip_steps == 0:
            epoch_order_state = train.rng_state()
            partial = {"loss_sum": 0.0, "correct": 0, "count": 0}
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for index, batch in enumerate(train.epoch()):
            if index < skip_steps:
                continue  # replaying a resumed epoch's order up to where it stopped
            if augment is not None:
                batch = Batch(*augment(batch.x, batch.y, augment_generator, batch.lengths), batch.lengths)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
                logits = forward(trained, batch)
            logits = logits.float()
            loss = step.loss(logits, batch.y)
            if config.l1:
                loss = loss + l1_penalty(model, config.l1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(model, config.clip_norm)
            optimizer_step()
            schedule.after_batch()
            global_step += 1
            loss_sum += loss.detach() * len(batch.y)
            correct += step.correct(logits.detach(), batch.y)
            partial["count"] += len(batch.y)
            if config.checkpoint_every and global_step % config.checkpoint_every == 0:
                partial["loss_sum"] += float(loss_sum)
                partial["correct"] += int(correct)
                loss_sum.zero_()
                correct.zero_()
                snapshot(epoch, index + 1)
        skip_steps = 0
        totals = distributed.sum_across_ranks(
            torch.tensor([partial["loss_sum"] + float(loss_sum), partial["correct"] + int(correct), partial["count"]],
                         dtype=torch.float64, device=device)
        ).tolist()
        count = int(totals[2])
        seen += count
        record_lr = float(optimizer.param_groups[0]["lr"])  # a tensor when compiled
        schedule.after_epoch()
        val_loss, val_accuracy, _, _ = evaluate(model, val, step)
        record = {
            "epoch": epoch,
            "train_loss": totals[0] / max(count, 1),
            "train_accuracy": totals[1] / max(count, 1),
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "learning_rate": record_lr,
        }
        history.append(record)
        tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
        if log_epochs:
            _log_epoch(epoch, config.epochs, record, time.perf_counter() - epoch_started, with_accuracy)
        else:
            progress.set_postfix(loss=f"{record['train_loss']:.4f}", val_loss=f"{val_loss:.4f}", val_acc=f"{val_accuracy:.3f}")
        score = sign * record[config.monitor]
        stop = False
        if score < progress_state["best_score"]:
            progress_state.update(best_score=score, best_loss=val_loss, best_epoch=epoch, stale=0)
            best_state = copy.deepcopy(model.state_dict())
            if on_best is not None and ranks.main:
                on_best(model, epoch)
        else:
            progress_state["stale"] += 1
            if progress_state["stale"] >= config.patience:
                log.info("early stop at epoch %d: no %s improvement for %d epochs", epoch, config.monitor, progress_state["stale"])
                stop = True
        partial = {"loss_sum": 0.0, "correct": 0, "count": 0}
        epoch_order_state = train.rng_state()
        snapshot(epoch + 1, 0)
        if on_epoch is not None:
            on_epoch(epoch, record)
        if stop:
            break
    progress.close()
    seconds = time.perf_counter() - started
    if best_state is not None and not config.keep_last:
        model.load_state_dict(best_state)
    return FitResult(
        best_epoch=progress_state["best_epoch"],
        best_val_loss=progress_state["best_loss"],
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


__all__ = ["ClassificationStep", "TaskStep", "FitConfig", "FitResult", "compiled_step", "evaluate", "fit", "forward", "resolve_device", "seed_everything"]
