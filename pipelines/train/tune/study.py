"""Running a study: an Optuna study over the space, inside one parent MLflow run that records it.

This is the order of things (check the space, open the data, create the study, run the
trials, record them); what a trial does is ``pipelines.train.tune.trials``, what the
parent run holds is ``pipelines.train.tune.record``. Optuna, MLflow and torch load
only when a study runs.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from pipelines.context import RunContext
from pipelines.errors import FluxoError
from pipelines.settings.tune import TuneSettings
from pipelines.train.tune.best import TuneResult
from pipelines.train.tune.record import record_best, record_study_start, record_trials
from pipelines.train.tune.space import apply_params, validate_space

if TYPE_CHECKING:
    import optuna

    from pipelines.data.versioning import DataVersion
    from pipelines.settings import FluxoSettings

# The study's logger for every line of it: users follow (and filter) one name, as before the split.
log = logging.getLogger("pipelines.train.tune")


def build_pruner(tune_settings: TuneSettings) -> optuna.pruners.BasePruner:
    import optuna

    if tune_settings.pruner == "none":
        return optuna.pruners.NopPruner()
    # Steps are 1-based epochs: warmup_epochs=2 keeps epochs 1 and 2 safe from pruning.
    return optuna.pruners.MedianPruner(
        n_startup_trials=tune_settings.startup_trials, n_warmup_steps=tune_settings.warmup_epochs + 1
    )


def tune(
    ctx: RunContext,
    tune_settings: TuneSettings,
    data_version: DataVersion,
    *,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> TuneResult:
    """Run the study on the dataset under the context's root as one MLflow run with a nested run per trial.

    ``sampler`` and ``pruner`` replace the ones ``tune_settings`` describe (TPE seeded
    with ``seed``; median or none), for callers that want another Optuna strategy.
    """
    import optuna

    import mlflow
    from pipelines.data.store import read_dataset
    from pipelines.train.preflight import resolve_model
    from pipelines.train.tune.trials import Objective

    root, settings = ctx.root, ctx.settings
    validate_space(settings, tune_settings)
    _warn_on_another_monitor(settings, tune_settings)
    dataset = read_dataset(root / settings.data.data_dir)
    dataset_name = dataset.manifest["name"]
    settings, chosen = resolve_model(settings, dataset)  # an unset model.name: chosen once, for every trial
    if chosen is not None:
        validate_space(settings, tune_settings)  # model.params.* against the model now known
    _quiet_optuna()

    metric = tune_settings.metric
    name = f"tune-{dataset_name}-{settings.model.name}"
    pruner = pruner or build_pruner(tune_settings)
    journal = None
    if settings.cluster.enabled:  # trials on a cluster's workers report into the study: a file they all see
        from pipelines.train.tune.spread import journal_path, journal_storage

        journal = journal_path(root, name)
    study = optuna.create_study(
        direction=tune_settings.direction,
        sampler=sampler or optuna.samplers.TPESampler(seed=tune_settings.seed),
        pruner=pruner,
        study_name=name,
        storage=journal_storage(journal) if journal is not None else None,
    )
    started = time.perf_counter()
    with mlflow.start_run(run_name=name) as parent:
        record_study_start(settings, tune_settings, data_version, dataset_name, sampler, pruner)
        if settings.cluster.enabled:  # trials at once on a Ray cluster (pipelines/train/tune/spread.py)
            from pipelines.cluster import ray_cluster
            from pipelines.train.tune.spread import optimize_on_cluster

            with ray_cluster(settings.cluster) as cluster:
                optimize_on_cluster(study, journal, root, settings, tune_settings, data_version, parent.info.run_id,
                                    cluster.cpus)
        else:
            study.optimize(Objective(root, settings, tune_settings, data_version), n_trials=tune_settings.trials,
                           timeout=tune_settings.timeout_s)
        seconds = time.perf_counter() - started
        rows, counts = record_trials(study, tune_settings, seconds)
        if counts["complete"] == 0:
            raise FluxoError(
                f"no trial of {len(rows)} completed ({counts['pruned']} pruned, {counts['failed']} failed); "
                "widen tune.space, raise tune.trials or tune.startup_trials, or set tune.pruner=none"
            )
        result = _result(study, settings, parent.info.run_id, rows, metric, seconds, counts)
        record_best(result)
    log.info(
        "study %s: best %s %.4f in trial %d of %d (%d pruned, %d failed, %.0f s) %s",
        result.parent_run_id, metric, result.best_value, result.best_trial, len(rows),
        counts["pruned"], counts["failed"], seconds, result.best_params,
    )
    return result


def _warn_on_another_monitor(settings: FluxoSettings, tune_settings: TuneSettings) -> None:
    """A trial is scored at the epoch early stopping kept, which follows train.monitor, not tune.metric."""
    if tune_settings.metric != settings.train.monitor:
        log.warning(
            "tune.metric=%s but train.monitor=%s: each trial keeps, and is scored at, the epoch with the best %s; "
            "set train.monitor=%s to score the epoch with the best %s",
            tune_settings.metric, settings.train.monitor, settings.train.monitor,
            tune_settings.metric, tune_settings.metric,
        )


def _quiet_optuna() -> None:
    """Optuna narrates every trial through its own handler; fluxo logs one line per trial itself."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


def _result(study: optuna.Study, settings: FluxoSettings, parent_run_id: str, rows: list[dict[str, Any]],
            metric: str, seconds: float, counts: dict[str, int]) -> TuneResult:
    """The study's outcome: its best trial, the settings that trial trained with, and every trial's row."""
    best = study.best_trial
    best_params = dict(best.params)
    return TuneResult(
        best_params=best_params,
        best_value=float(best.value),  # type: ignore[arg-type]
        best_settings=apply_params(settings, best_params),
        parent_run_id=parent_run_id,
        trials=rows,
        metric=metric,
        best_trial=best.number,
        best_run_id=best.user_attrs.get("run_id", ""),
        seconds=seconds,
        counts=counts,
    )


__all__ = ["build_pruner", "tune"]
