"""What a study records in its parent MLflow run: how it searched, every trial, and the best one.

Kept apart from running the study so the parent run's contents (param, metric, tag
and artifact names that dashboards and ``fluxo`` read back) are in one place.
MLflow, Optuna and matplotlib load only when a study records.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.settings.tune import TuneSettings
from pipelines.train.tune.best import TuneResult, write_best_preset

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure

    from pipelines.data.versioning import DataVersion
    from pipelines.settings import FluxoSettings


def record_study_start(settings: FluxoSettings, tune_settings: TuneSettings, data_version: DataVersion,
                       dataset_name: str, sampler: Any, pruner: Any) -> None:
    """The parent run's tags and params: what is searched, how, on which data and model."""
    import mlflow

    mlflow.set_tags(
        {"fluxo.tune.role": "study", "data_version": data_version.md5, "dataset": dataset_name,
         "model": settings.model.name}
    )
    mlflow.log_params(
        {
            "tune.trials": tune_settings.trials,
            "tune.timeout_s": tune_settings.timeout_s,
            "tune.metric": tune_settings.metric,
            "tune.direction": tune_settings.direction,
            "tune.pruner": type(pruner).__name__ if pruner else tune_settings.pruner,
            "tune.sampler": type(sampler).__name__ if sampler else "TPESampler",
            "tune.seed": tune_settings.seed,
            "tune.space": json.dumps(
                {k: v.model_dump(exclude_defaults=True) for k, v in tune_settings.space.items()}, sort_keys=True
            ),
            "model.name": settings.model.name,
            "data.version": data_version.md5,
        }
    )


def record_trials(study: optuna.Study, tune_settings: TuneSettings,
                  seconds: float) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every trial into the parent run (counts, table as JSON and CSV, history plot); returns the rows and counts."""
    import matplotlib.pyplot as plt

    import mlflow

    metric = tune_settings.metric
    rows = trials_table(study, tune_settings)
    counts = {state: sum(r["state"] == state for r in rows) for state in ("complete", "pruned", "failed")}
    mlflow.log_metrics({f"trials_{k}": v for k, v in counts.items()} | {"tune_seconds": seconds})
    mlflow.log_dict({"metric": metric, "direction": tune_settings.direction, "trials": rows}, "tune/trials.json")
    with tempfile.TemporaryDirectory() as scratch:
        table = Path(scratch) / "trials.csv"
        write_trials_csv(rows, table)
        mlflow.log_artifact(str(table), "tune")
    figure = optimization_history_figure(rows, metric, tune_settings.direction)
    mlflow.log_figure(figure, "plots/optimization_history.png")
    plt.close(figure)
    return rows, counts


def record_best(result: TuneResult) -> None:
    """The best trial's params, value and run into the parent run, with its configuration as a preset."""
    import mlflow

    mlflow.log_params({f"best.{k}": v for k, v in result.best_params.items()})
    mlflow.log_metric(f"best_{result.metric}", result.best_value)
    mlflow.set_tags({"fluxo.tune.best_trial": str(result.best_trial), "fluxo.tune.best_run_id": result.best_run_id})
    with tempfile.TemporaryDirectory() as scratch:
        preset = write_best_preset(result, Path(scratch) / "best_preset.yaml")
        mlflow.log_artifact(str(preset), "tune")


def trials_table(study: optuna.Study, tune_settings: TuneSettings) -> list[dict[str, Any]]:
    """One row per trial: number, state, objective, epochs trained, seconds, run id, then each key."""
    from optuna.trial import TrialState

    names = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
    rows = []
    for trial in study.get_trials(deepcopy=False):
        value = trial.value
        if value is None and trial.intermediate_values:
            value = trial.intermediate_values[trial.last_step]  # where a pruned trial stood
        rows.append(
            {
                "trial": trial.number,
                "state": names.get(trial.state, trial.state.name.lower()),
                "value": None if value is None or not math.isfinite(value) else float(value),
                "epochs": trial.user_attrs.get("epochs"),
                "seconds": round(trial.duration.total_seconds(), 2) if trial.duration else None,
                "run_id": trial.user_attrs.get("run_id"),
                "test_accuracy": trial.user_attrs.get("test_accuracy"),
                **{key: trial.params.get(key) for key in tune_settings.space},
            }
        )
    return rows


def write_trials_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def optimization_history_figure(rows: list[dict[str, Any]], metric: str, direction: str) -> Figure:
    """Each trial's value, pruned ones where they stopped, and the best so far as a step line."""
    import matplotlib.pyplot as plt

    better = max if direction == "maximize" else min
    figure, axes = plt.subplots(figsize=(7, 4))
    for state, marker, colour in (("complete", "o", "tab:blue"), ("pruned", "x", "tab:grey")):
        points = [(r["trial"], r["value"]) for r in rows if r["state"] == state and r["value"] is not None]
        if points:
            axes.scatter(*zip(*points), marker=marker, color=colour, label=state, zorder=3)
    best_x, best_y, current = [], [], None
    for row in rows:
        if row["state"] == "complete" and row["value"] is not None:
            current = row["value"] if current is None else better(current, row["value"])
        if current is not None:
            best_x.append(row["trial"])
            best_y.append(current)
    if best_x:
        axes.step(best_x, best_y, where="post", color="tab:red", label="best so far")
    axes.set_xlabel("trial")
    axes.set_ylabel(metric)
    axes.set_title(f"optimisation history ({'higher' if direction == 'maximize' else 'lower'} is better)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


__all__ = ["optimization_history_figure", "record_best", "record_study_start", "record_trials", "trials_table",
           "write_trials_csv"]
