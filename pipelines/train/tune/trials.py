"""One trial of a study: sampled settings trained as an ordinary run, nested under the study's MLflow run.

Each trial is ``train_and_evaluate`` on settings that differ from the preset only in
the sampled keys, so its MLflow run holds everything a normal run does. It reports
the validation metric after every epoch (a training callback) and the pruner may
stop it there. This module loads torch (through the training code): the study
imports it only when it runs.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.settings.tune import TuneSettings
from pipelines.train.callbacks import Callback
from pipelines.train.fit_state import FitState
from pipelines.train.tune.space import apply_params, suggest

if TYPE_CHECKING:
    import optuna

    from pipelines.data.versioning import DataVersion
    from pipelines.settings import FluxoSettings

# The study's logger for every line of it: users follow (and filter) one name, as before the split.
log = logging.getLogger("pipelines.train.tune")


class PruneTrial(Callback):
    """Reports each epoch's metric to the trial and raises ``optuna.TrialPruned`` when the pruner says so."""

    def __init__(self, trial: optuna.trial.Trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.epoch = 0  # the last epoch reported: where a pruned trial stopped

    def on_epoch_end(self, state: FitState) -> None:
        import optuna

        value = float(state.record[self.metric])
        self.trial.report(value, state.epoch)
        self.epoch = state.epoch
        self.trial.set_user_attr("epochs", state.epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(
                f"trial {self.trial.number} pruned at epoch {state.epoch}: {self.metric} {value:.4f}"
            )


def train_trial(
    root: Path, settings: FluxoSettings, data_version: DataVersion, run_id: str, pruning: PruneTrial,
) -> tuple[dict[str, Any], dict[str, float], Path, Any]:
    """Train one trial's settings in the active (nested) MLflow run."""
    from pipelines.train.run import train_and_evaluate
    from pipelines.train.tracker import MLflowTracker

    # The baseline answers "is this model worth it?" once per run, not once per trial.
    settings = settings.model_copy(update={"train": settings.train.model_copy(update={"baseline_epochs": 0})})
    return train_and_evaluate(root, settings, data_version, MLflowTracker(), run_key=run_id, callbacks=[pruning])


class Objective:
    """What Optuna optimises: one trial, as a nested MLflow run, scored at its best epoch."""

    def __init__(self, root: Path, settings: FluxoSettings, tune_settings: TuneSettings,
                 data_version: DataVersion, parent_run_id: str | None = None) -> None:
        """``parent_run_id``: the study's run, for a trial run in another process (a cluster's worker);
        None: the active run of this process is the parent."""
        self.root, self.settings, self.tune_settings, self.data_version = root, settings, tune_settings, data_version
        self.parent_run_id = parent_run_id

    def __call__(self, trial: optuna.trial.Trial) -> float:
        import optuna

        import mlflow

        params = suggest(trial, self.tune_settings.space, self.settings)
        trial_settings = apply_params(self.settings, params)
        run = mlflow.start_run(run_name=f"trial-{trial.number}", nested=self.parent_run_id is None,
                               parent_run_id=self.parent_run_id)
        run_id = run.info.run_id
        trial.set_user_attr("run_id", run_id)
        status = "FAILED"
        try:
            mlflow.set_tags({"fluxo.tune.role": "trial", "fluxo.tune.trial": str(trial.number)})
            mlflow.log_params({f"tune.{k}": v for k, v in params.items()})
            pruning = PruneTrial(trial, self.tune_settings.metric)
            try:
                _, test_metrics, _, result = train_trial(self.root, trial_settings, self.data_version, run_id, pruning)
            except optuna.TrialPruned:
                mlflow.set_tags({"fluxo.tune.state": "pruned", "fluxo.tune.pruned_at_epoch": str(pruning.epoch)})
                # A pruned run stopped on purpose: KILLED keeps it out of "newest finished run" look-ups.
                status = "KILLED"
                log.info("trial %d pruned at epoch %d %s", trial.number, pruning.epoch, params)
                raise
            value = self._score(trial, result, test_metrics, params)
            status = "FINISHED"
            return value  # NaN (diverged) makes Optuna mark the trial failed and go on
        finally:
            mlflow.end_run(status=status)
            # Trials are not resumed one by one; their resumable state would only mislead `--resume`.
            shutil.rmtree(self.root / trial_settings.train.checkpoint_dir / run_id / "state", ignore_errors=True)

    def _score(self, trial: optuna.trial.Trial, result: Any, test_metrics: dict[str, float],
               params: dict[str, Any]) -> float:
        """The metric at the epoch the trial kept (the best by ``train.monitor``), recorded in its run."""
        import mlflow

        metric = self.tune_settings.metric
        value = float(result.history[result.best_epoch - 1][metric])
        trial.set_user_attr("test_accuracy", test_metrics.get("test_accuracy"))
        mlflow.set_tag("fluxo.tune.state", "complete" if math.isfinite(value) else "failed")
        mlflow.log_metric("tune_objective", value)
        log.info("trial %d: %s %.4f (epoch %d) %s", trial.number, metric, value, result.best_epoch, params)
        return value


__all__ = ["Objective", "PruneTrial", "train_trial"]
