"""The training engine: fit with early stopping on validation loss, keep the best weights.

Batches come from ``pipelines.train.batches``: resident tensors on the device when
the data fits (each step is a slice, not a DataLoader round trip), streamed shards
when it does not. The loop synchronises with the device once per epoch.

The loop only trains and validates; reporting, early stopping and checkpoints are
callbacks (``pipelines.train.callbacks``) around it, so the engine knows nothing of
MLflow or of where files go, and the same loop serves runs, tuning and benchmarks.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipelines.train import distributed
from pipelines.train.batches import Batch, ResidentBatches, StreamingBatches
from pipelines.train.callbacks import Callback, EarlyStopping, ProgressReport
from pipelines.train.fit_state import FitState, fresh_partial, restore
from pipelines.train.losses import Task, build_task
from pipelines.train.optim import (
    build_optimizer,
    build_scheduler,
    clip_gradients,
    l1_penalty,
    parameter_groups,
)

if TYPE_CHECKING:
    from pipelines.settings import TrainSettings

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


@dataclass(frozen=True)
class FitConfig:
    """How one fit trains: the ``train`` settings the loop reads, fixed for its length.

    Built with :meth:`from_settings`, so each default lives once, in ``TrainSettings``;
    a variant of a run's fit (the retraining pass) is ``dataclasses.replace`` of it.
    """

    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    patience: int
    seed: int
    monitor: str  # which validation number early stopping follows: val_loss or val_accuracy
    optimizer: str
    momentum: float
    nesterov: bool
    scheduler: str
    scheduler_options: Mapping[str, Any]
    l1: float
    clip_norm: float | None
    checkpoint_every: int  # callbacks' on_interval every N optimiser steps (0: at epoch ends only)
    precision: str  # bf16: autocast matmuls/convolutions to bfloat16 (GPU tensor cores)
    compile: bool  # torch.compile forward/backward and the optimiser step (lr as a tensor)
    compile_mode: str  # the model's torch.compile mode; reduce-overhead: CUDA graphs
    # Not a setting: only the retraining pass on train+val, which has no held-out data to pick by, sets it.
    keep_last: bool = False  # end with the last epoch's weights instead of the best validation epoch's

    @classmethod
    def from_settings(cls, train: TrainSettings) -> FitConfig:
        """The fit a run's ``train`` settings describe; every field but ``keep_last`` is a setting of that name."""
        names = {f.name for f in dataclasses.fields(cls)} - {"keep_last"}
        return cls(**{name: getattr(train, name) for name in names})


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


class _Loop:
    """One fit's moving parts: the module that trains, its optimiser and schedule, and the shared state.

    A class so that the steps of a fit (restore, train an epoch, close it) share these
    without a dozen arguments each; :func:`fit` is the way in.
    """

    def __init__(self, model: nn.Module, train: Batches, val: Batches, config: FitConfig, step: TaskStep,
                 augment: Augment | None) -> None:
        self.model, self.train, self.val, self.config = model, train, val, config
        self.step, self.augment = step, augment
        ranks = distributed.current()
        # Training steps go through the DDP wrapper (it all-reduces gradients); everything else,
        # evaluation and state dicts included, uses the plain module, identical on every rank.
        trained = torch.nn.parallel.DistributedDataParallel(model) if ranks.active else model
        self.trained = torch.compile(trained, mode=config.compile_mode) if config.compile else trained
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
        self.optimizer_step = compiled_step(optimizer) if config.compile else optimizer.step
        self.state = FitState(
            model=model, optimizer=optimizer, schedule=schedule,
            augment_generator=torch.Generator().manual_seed(config.seed + 1), order_rng=train.rng_state(),
            main=ranks.main,
        )
        self.skip_steps = 0  # steps of the first epoch a resumed state had already trained
        self.device = next(model.parameters()).device

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from a state ``Checkpointing`` saved: its epoch resumes after the steps it had done."""
        self.skip_steps = restore(self.state, saved, self.train)
        log.info("resuming at epoch %d, step %d (global step %d)", self.state.epoch, self.skip_steps,
                 self.state.global_step)

    def run(self, callbacks: Sequence[Callback]) -> FitResult:
        """Train epoch by epoch, calling ``callbacks`` at each point, until the last epoch or a stop."""
        state, config = self.state, self.config
        started = time.perf_counter()
        seen = 0
        for callback in callbacks:
            callback.on_fit_start(state)
        for epoch in range(state.epoch, config.epochs + 1):
            state.epoch = epoch
            for callback in callbacks:
                callback.on_epoch_start(state)
            seen += self._close_epoch(self._train_epoch(callbacks))
            for callback in callbacks:
                callback.on_epoch_end(state)
            if state.stop:
                break
        for callback in callbacks:
            callback.on_fit_end(state)
        seconds = time.perf_counter() - started
        if state.best_state is not None and not config.keep_last:
            self.model.load_state_dict(state.best_state)
        return FitResult(
            best_epoch=state.progress["best_epoch"],
            best_val_loss=state.progress["best_loss"],
            epochs_run=len(state.history),
            history=state.history,
            seconds=seconds,
            samples_per_second=seen / seconds if seconds > 0 else 0.0,
            stopped_early=len(state.history) < config.epochs,
        )

    def _train_epoch(self, callbacks: Sequence[Callback]) -> list[float]:
        """One pass over the training batches; the loss sum, correct count and samples, summed over ranks.

        The sums stay on the device (one synchronisation per epoch) except at checkpoint
        intervals, where they join ``state.partial`` so a snapshot holds them.
        """
        state, every = self.state, self.config.checkpoint_every
        if self.skip_steps == 0:
            state.order_rng = self.train.rng_state()
            state.partial = fresh_partial()
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for index, batch in enumerate(self.train.epoch()):
            if index < self.skip_steps:
                continue  # replaying a resumed epoch's order up to where it stopped
            batch, logits, loss = self._step(batch)
            state.global_step += 1
            loss_sum += loss.detach() * len(batch.y)
            correct += self.step.correct(logits.detach(), batch.y)
            state.partial["count"] += len(batch.y)
            if every and state.global_step % every == 0:
                state.partial["loss_sum"] += float(loss_sum)
                state.partial["correct"] += int(correct)
                loss_sum.zero_()
                correct.zero_()
                state.step_in_epoch = index + 1
                for callback in callbacks:
                    callback.on_interval(state)
        self.skip_steps = 0
        partial = state.partial
        return distributed.sum_across_ranks(
            torch.tensor([partial["loss_sum"] + float(loss_sum), partial["correct"] + int(correct), partial["count"]],
                         dtype=torch.float64, device=self.device)
        ).tolist()

    def _step(self, batch: Batch) -> tuple[Batch, torch.Tensor, torch.Tensor]:
        """One optimiser step on one batch (augmented first, when asked): the batch trained on, its logits, its loss."""
        config, model = self.config, self.model
        if self.augment is not None:
            batch = Batch(*self.augment(batch.x, batch.y, self.state.augment_generator, batch.lengths), batch.lengths)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            logits = forward(self.trained, batch)
        logits = logits.float()
        loss = self.step.loss(logits, batch.y)
        if config.l1:
            loss = loss + l1_penalty(model, config.l1)
        optimizer = self.state.optimizer
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(model, config.clip_norm)
        self.optimizer_step()
        self.state.schedule.after_batch()
        return batch, logits, loss

    def _close_epoch(self, totals: list[float]) -> int:
        """Validate, record the epoch in ``state``, start the next one's sums; returns the samples trained on."""
        state = self.state
        count = int(totals[2])
        learning_rate = float(state.optimizer.param_groups[0]["lr"])  # a tensor when compiled
        state.schedule.after_epoch()
        val_loss, val_accuracy, val_outputs, val_targets = evaluate(self.model, self.val, self.step)
        state.record = {
            "epoch": state.epoch,
            "train_loss": totals[0] / max(count, 1),
            "train_accuracy": totals[1] / max(count, 1),
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "learning_rate": learning_rate,
        }
        task = self.step.task
        if task.name == "regression":  # what the race ranks regression by, whatever the loss is
            state.record["val_r2"] = task.metrics(val_targets.cpu(), task.scores(val_outputs).cpu())["r2"]
        state.history.append(state.record)
        state.partial = fresh_partial()
        state.order_rng = self.train.rng_state()
        return count


def fit(
    model: nn.Module,
    train: Batches,
    val: Batches,
    config: FitConfig,
    callbacks: Sequence[Callback] = (),
    *,
    step: TaskStep | None = None,
    augment: Augment | None = None,
    resume: dict[str, Any] | None = None,
) -> FitResult:
    """Train until the monitored validation number stops improving for ``config.patience`` epochs.

    The model is left holding the best epoch's weights (the last's with ``config.keep_last``).
    Early stopping and the progress report follow from ``config`` and always run first;
    ``callbacks`` come after them, in order, for everything else: a tracker
    (:class:`~pipelines.train.callbacks.Tracking`), the export checkpoint
    (``SaveBest``), the resumable state (``Checkpointing``), or a check that raises to
    stop (Optuna pruning). ``step`` is the task's loss (multiclass by default);
    ``augment`` transforms training batches only, on the device.

    ``resume`` is a state ``Checkpointing`` saved: training continues exactly where it
    stopped, bit for bit on the CPU.
    """
    loop = _Loop(model, train, val, config, step or ClassificationStep(), augment)
    if resume is not None:
        loop.restore(resume)
    with_accuracy = loop.step.task.name != "regression"
    standard = [ProgressReport(config.epochs, with_accuracy), EarlyStopping(config.monitor, config.patience)]
    return loop.run([*standard, *callbacks])


def seed_everything(seed: int) -> None:
    """Same seed, same weights and batch order (on the CPU, bit for bit)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


__all__ = [
    "Augment",
    "ClassificationStep",
    "FitConfig",
    "FitResult",
    "TaskStep",
    "compiled_step",
    "evaluate",
    "fit",
    "forward",
    "resolve_device",
    "seed_everything",
]
