"""What happens around the training loop, one concern per object: reporting, early stopping, checkpoints.

The engine (``pipelines.train.engine``) only trains and validates; at fixed points it
calls each callback's hooks with the shared :class:`~pipelines.train.fit_state.FitState`.
That keeps the loop readable and lets a caller add a concern (a tracker, an Optuna
pruning check) without another argument to ``fit``. Callbacks run in list order, so
a later one sees what an earlier one decided (``SaveBest`` reads early stopping's
``state.improved``).

Nothing here imports MLflow: ``Tracking`` reports to any :class:`~pipelines.train.tracker.Tracker`.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pipelines.train.checkpoint import model_payload, save_checkpoint, save_state
from pipelines.train.fit_state import FitState, resumable_state
from pipelines.train.tracker import Tracker

# The engine's logger, not this module's: these lines are the engine's narrative, and callers
# filter or quieten them under that name (pipelines/train/auto.py, the tests).
log = logging.getLogger("pipelines.train.engine")


class Callback:
    """Hooks the engine calls; each is a no-op here, so a callback defines only those it needs."""

    def on_fit_start(self, state: FitState) -> None:
        """Before the first epoch (after a resumed state was restored)."""

    def on_epoch_start(self, state: FitState) -> None:
        """Before an epoch's first training step."""

    def on_interval(self, state: FitState) -> None:
        """Every ``FitConfig.checkpoint_every`` optimiser steps, with the epoch's running sums in ``state.partial``."""

    def on_epoch_end(self, state: FitState) -> None:
        """After the epoch's validation: ``state.record`` holds its numbers."""

    def on_fit_end(self, state: FitState) -> None:
        """After the last epoch, before the best weights are put back."""


class ProgressReport(Callback):
    """A progress bar on a terminal; elsewhere one INFO line per epoch, from the main rank only.

    tqdm hides the bar when stderr is not a terminal (CI logs, nohup, a Prefect worker);
    the log line is then the only sign that training is alive, with the numbers a bar would show.
    """

    def __init__(self, epochs: int, with_accuracy: bool) -> None:
        self.epochs = epochs
        self.with_accuracy = with_accuracy  # regression has no accuracy to show
        self.bar: Any = None
        self.log_epochs = False
        self.epoch_started = 0.0

    def on_fit_start(self, state: FitState) -> None:
        self.bar = tqdm(total=self.epochs - state.epoch + 1, desc="train", unit="epoch", leave=False, disable=None)
        self.log_epochs = bool(self.bar.disable) and state.main  # every rank holds the same numbers

    def on_epoch_start(self, state: FitState) -> None:
        self.epoch_started = time.perf_counter()

    def on_epoch_end(self, state: FitState) -> None:
        record = state.record
        if self.log_epochs:
            accuracy = f", val_accuracy {record['val_accuracy']:.4f}" if self.with_accuracy else ""
            log.info("epoch %d/%d: train_loss %.4f, val_loss %.4f%s (%.1f s)", state.epoch, self.epochs,
                     record["train_loss"], record["val_loss"], accuracy, time.perf_counter() - self.epoch_started)
        else:
            self.bar.set_postfix(loss=f"{record['train_loss']:.4f}", val_loss=f"{record['val_loss']:.4f}",
                                 val_acc=f"{record['val_accuracy']:.3f}")
        self.bar.update()

    def on_fit_end(self, state: FitState) -> None:
        self.bar.close()


class EarlyStopping(Callback):
    """Follows the monitored validation number: keeps the best epoch's weights, stops once it stalls.

    Both monitors are turned into "lower is better" so one comparison serves them. The
    counters live in ``state.progress`` (not here) because a resumed run restores them
    and the fit's result reports the best epoch from them.
    """

    def __init__(self, monitor: str, patience: int) -> None:
        self.monitor = monitor
        self.patience = patience
        self.sign = -1.0 if monitor == "val_accuracy" else 1.0

    def on_epoch_end(self, state: FitState) -> None:
        progress = state.progress
        score = self.sign * state.record[self.monitor]
        state.improved = score < progress["best_score"]
        if state.improved:
            progress.update(best_score=score, best_loss=state.record["val_loss"], best_epoch=state.epoch, stale=0)
            state.best_state = copy.deepcopy(state.model.state_dict())
            return
        progress["stale"] += 1
        if progress["stale"] >= self.patience:
            log.info("early stop at epoch %d: no %s improvement for %d epochs", state.epoch, self.monitor,
                     progress["stale"])
            state.stop = True


class Tracking(Callback):
    """Each epoch's numbers to a tracker (MLflow in a run, nothing in a benchmark), at the epoch as step."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def on_epoch_end(self, state: FitState) -> None:
        self.tracker.log_metrics({k: v for k, v in state.record.items() if k != "epoch"}, step=state.epoch)


class SaveBest(Callback):
    """Writes the exportable checkpoint (weights and model spec) each time the best epoch improves.

    It must come after :class:`EarlyStopping`, whose verdict it reads; written on the
    main rank only, since every rank holds the same weights.
    """

    def __init__(self, path: Path, spec: dict[str, Any]) -> None:
        self.path = path
        self.spec = spec

    def on_epoch_end(self, state: FitState) -> None:
        if state.improved and state.main:
            save_checkpoint(self.path, {**model_payload(state.model, self.spec), "epoch": state.epoch})


class Checkpointing(Callback):
    """Saves the resumable training state atomically at each epoch end and every checkpoint interval.

    ``extra`` is stored alongside (the run key, settings and data version a resume checks).
    Only the main rank writes; a resume hands its state to every rank.
    """

    def __init__(self, directory: Path, extra: dict[str, Any]) -> None:
        self.directory = directory
        self.extra = extra

    def on_interval(self, state: FitState) -> None:
        self._save(state, state.epoch, state.step_in_epoch)

    def on_epoch_end(self, state: FitState) -> None:
        self._save(state, state.epoch + 1, 0)  # the next epoch, from its start

    def _save(self, state: FitState, epoch: int, step_in_epoch: int) -> None:
        if state.main:
            save_state(self.directory, state.global_step, resumable_state(state, epoch, step_in_epoch, self.extra))


__all__ = ["Callback", "Checkpointing", "EarlyStopping", "ProgressReport", "SaveBest", "Tracking"]
