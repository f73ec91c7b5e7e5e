"""Hyper-parameter search: an Optuna study over a preset's ``tune.space``, one nested MLflow run per trial.

Each trial is an ordinary training run (``train_and_evaluate``) on settings that differ
from the preset only in the sampled keys, so its MLflow run holds everything a normal
run does. Trials report the validation metric after every epoch and the pruner may stop
them early. The parent run holds the study: best value and parameters, a trials table,
an optimisation-history plot and the best configuration as a preset that
``fluxo run --config`` trains and exports as it stands.

One module per concern: the search space and its sampling (``space``), a trial
(``trials``), running the study (``study``), what the parent run records (``record``)
and the best configuration as a preset (``best``). This package re-exports what
callers import, so ``from pipelines.train.tune import tune`` reads as it always has.

Its settings (``TuneSettings``, ``ParamSpace``) live in ``pipelines.settings.tune``;
torch, Optuna and MLflow load only when a study runs.
"""

from __future__ import annotations

from pipelines.settings.tune import ParamSpace, Scalar, TuneSettings
from pipelines.train.tune.best import (
    TuneResult,
    best_overrides,
    format_value,
    preset_dict,
    write_best_preset,
)
from pipelines.train.tune.record import (
    optimization_history_figure,
    trials_table,
    write_trials_csv,
)
from pipelines.train.tune.space import apply_params, suggest, validate_space
from pipelines.train.tune.study import build_pruner, tune

__all__ = [
    "ParamSpace", "Scalar", "TuneResult", "TuneSettings", "apply_params", "best_overrides", "build_pruner",
    "format_value", "optimization_history_figure", "preset_dict", "suggest", "trials_table", "tune",
    "validate_space", "write_best_preset", "write_trials_csv",
]
