"""What a fit holds between steps, in one object, and the resumable-state format built from it.

The engine's loop and its callbacks (``pipelines.train.callbacks``) share this object
instead of a dozen loop variables: a callback reads the epoch's record, early stopping
updates the best-so-far, checkpointing writes all of it. Writing and reading the
resumable state sit side by side here so the two cannot drift apart; the format
(its keys and their meaning) is what ``fluxo train --resume`` reads back from older runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from pipelines.train.checkpoint import restore_rng_states, rng_states
from pipelines.train.optim import Schedule


def fresh_partial() -> dict[str, float]:
    """Running sums of an epoch's training loss, correct predictions and samples, as of the last checkpoint."""
    return {"loss_sum": 0.0, "correct": 0, "count": 0}


def fresh_progress() -> dict[str, float]:
    """Early stopping's counters before any epoch: every score beats infinity.

    ``best_score`` is the monitored number turned "lower is better"; ``best_loss`` the
    validation loss at that epoch; ``stale`` the epochs since it last improved.
    """
    return {"best_score": float("inf"), "best_loss": float("inf"), "best_epoch": 0, "stale": 0}


class OrderedBatches(Protocol):
    """The part of a batch source the resumable state needs: its shuffling RNG."""

    def rng_state(self) -> Any: ...
    def set_rng_state(self, state: Any) -> None: ...


@dataclass
class FitState:
    """Everything one fit has in hand; callbacks read it and early stopping writes its part.

    ``epoch`` is the epoch being trained (1-based); ``step_in_epoch`` the optimiser steps
    done in it when a checkpoint interval falls mid-epoch. ``record`` is the latest
    epoch's numbers (also appended to ``history``). ``improved`` says whether that epoch
    became the best so far; a callback sets ``stop`` to end training after this epoch.
    ``main`` is False on the other ranks of a distributed run, which write nothing.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    augment_generator: torch.Generator
    order_rng: Any  # the training batches' shuffling RNG as the current epoch began
    main: bool
    epoch: int = 1
    step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    record: dict[str, float] = field(default_factory=dict)
    progress: dict[str, float] = field(default_factory=fresh_progress)
    best_state: dict[str, torch.Tensor] | None = None
    partial: dict[str, float] = field(default_factory=fresh_partial)
    improved: bool = False
    stop: bool = False


def resumable_state(state: FitState, epoch: int, step_in_epoch: int, extra: dict[str, Any]) -> dict[str, Any]:
    """The full training state to continue from ``epoch`` after ``step_in_epoch`` steps, bit for bit on the CPU."""
    scheduler = state.schedule.scheduler
    return {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": None,  # no AMP scaler on this path; the key keeps the format stable
        "augment_rng": state.augment_generator.get_state(),
        "order_rng": state.order_rng,
        "rng": rng_states(),
        "progress": state.progress,
        "best_state": state.best_state,
        "history": state.history,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "global_step": state.global_step,
        "partial": dict(state.partial),
        **extra,
    }


def restore(state: FitState, saved: dict[str, Any], train: OrderedBatches) -> int:
    """Put a :func:`resumable_state` back into ``state`` and ``train``; returns the steps to skip in its epoch.

    The model, optimiser and scheduler in ``state`` must be built as they were when it was saved.
    """
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    if state.schedule.scheduler is not None and saved.get("scheduler"):
        state.schedule.scheduler.load_state_dict(saved["scheduler"])
    state.augment_generator.set_state(saved["augment_rng"])
    train.set_rng_state(saved["order_rng"])
    state.order_rng = saved["order_rng"]
    restore_rng_states(saved["rng"])
    state.progress = dict(saved["progress"])
    state.best_state = saved["best_state"]
    state.history = list(saved["history"])
    state.epoch, state.global_step = saved["epoch"], saved["global_step"]
    state.partial = dict(saved["partial"])
    return saved["step_in_epoch"]


__all__ = ["FitState", "OrderedBatches", "fresh_partial", "fresh_progress", "restore", "resumable_state"]
