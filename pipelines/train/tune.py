"""Hyper-parameter search: an Optuna study over a preset's ``tune.space``, one nested MLflow run per trial.

Each trial is an ordinary training run (``train_and_evaluate``) on settings that differ
from the preset only in the sampled keys, so its MLflow run holds everything a normal
run does. Trials report the validation metric after every epoch and the pruner may stop
them early. The parent run holds the study: best value and parameters, a trials table,
an optimisation-history plot and the best configuration as a preset that
``fluxo run --config`` trains and exports as it stands.

Its settings (``TuneSettings``, ``ParamSpace``) live in ``pipelines.settings.tune``;
torch, Optuna and MLflow load only when a study runs.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml
from pydantic import ValidationError

from pipelines.errors import FluxoError
from pipelines.settings import merge_tree
from pipelines.settings.tune import ParamSpace, Scalar, TuneSettings  # noqa: F401 - re-exported

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure

    from pipelines.settings import FluxoSettings
    from pipelines.data.versioning import DataVersion

log = logging.getLogger(__name__)


# Where a run keeps its stores, not what it trains: a written preset leaves these to the
# environment of whoever runs it (presets outrank FLUXO_* variables).
_LOCATION_KEYS = {"data": {"dvc_remote", "dvc_remote_endpoint_url"}, "tracking": {"tracking_uri"}}
# A preset says what it trains even where that is the default.
_ALWAYS_WRITTEN = (("data", "dataset"), ("model", "name"))


@dataclass
class TuneResult:
    best_params: dict[str, Any]
    best_value: float
    best_settings: FluxoSettings
    parent_run_id: str
    trials: list[dict[str, Any]]
    metric: str = "val_loss"
    best_trial: int = 0
    best_run_id: str = ""
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------- settings paths


def _settings_dict(settings: FluxoSettings) -> dict[str, Any]:
    # The tune section stays out: a trial's settings are a training configuration, and
    # validating them must not validate (and so recurse into) the search space again.
    dumped = settings.model_dump()
    dumped.pop("tune", None)
    return dumped


def _set_path(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise FluxoError(
                f"tune.space[{key!r}]: {'.'.join(parts[: depth + 1])} is a single setting, not a section; "
                "keys are dotted setting paths such as train.learning_rate or model.params.channels"
            )
        node = child
    node[parts[-1]] = value


def _get_path(tree: dict[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def apply_params(settings: FluxoSettings, params: dict[str, Any]) -> FluxoSettings:
    """``settings`` with each dotted key set to its value, validated as a whole."""
    from pipelines.settings import FluxoSettings

    tree = _settings_dict(settings)
    for key, value in params.items():
        _set_path(tree, key, value)
    try:
        return FluxoSettings.model_validate(tree)
    except ValidationError as error:
        raise FluxoError(f"settings {params}: {_problems(error)}") from error


def _problems(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())


def _when_holds(when: dict[str, Any] | None, chosen: dict[str, Any], base: dict[str, Any]) -> bool:
    for key, wanted in (when or {}).items():
        current = chosen[key] if key in chosen else _get_path(base, key)
        if current not in (wanted if isinstance(wanted, list) else [wanted]):
            return False
    return True


def validate_space(settings: FluxoSettings, tune_settings: TuneSettings) -> None:
    """Fail before any training when a space key is not a setting or a value would be refused.

    Each key is applied, at every candidate value (each choice, both ends of a range), to
    ``settings`` and the result validated like a preset; ``model.params.*`` keys are
    also checked against the model builder's arguments.
    """
    from pipelines.settings import FluxoSettings

    space = tune_settings.space
    if not space:
        raise FluxoError(
            "tune.space is empty: add the settings to search to the preset's tune section, e.g. "
            "tune: {space: {train.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}}}"
        )
    base = _settings_dict(settings)
    builder_arguments = _builder_arguments(settings.model.name) if "model.name" not in space else None
    for index, (key, spec) in enumerate(space.items()):
        for condition, wanted in (spec.when or {}).items():
            values = wanted if isinstance(wanted, list) else [wanted]
            if condition == key:
                raise FluxoError(f"tune.space[{key!r}].when: a setting cannot depend on itself")
            if condition in space:
                if list(space).index(condition) > index:
                    raise FluxoError(
                        f"tune.space[{key!r}].when names {condition}, which is searched later; "
                        f"move {condition} above {key} in the space"
                    )
                if not any(space[condition].contains(v) for v in values):
                    raise FluxoError(
                        f"tune.space[{key!r}].when: {condition} is never {wanted!r} in the space, so {key} "
                        "would never be searched"
                    )
                continue
            for value in values:
                tree = copy.deepcopy(base)
                _set_path(tree, condition, value)
                try:
                    FluxoSettings.model_validate(tree)
                except ValidationError as error:
                    raise FluxoError(
                        f"tune.space[{key!r}].when: {condition}={value!r} is not a setting and value "
                        f"({_problems(error)})"
                    ) from error
        if key.startswith("model.params.") and builder_arguments is not None:
            name = key.removeprefix("model.params.")
            if name not in builder_arguments:
                raise FluxoError(
                    f"tune.space[{key!r}]: model {settings.model.name!r} takes no argument {name!r}; "
                    f"it takes {', '.join(sorted(builder_arguments))}"
                )
        # Conditions are applied with the value, so a conditional value is checked in the
        # company it will keep (first allowed value of each condition).
        context = {
            c: (w[0] if isinstance(w, list) and w else w) for c, w in (spec.when or {}).items()
        }
        for value in spec.candidates():
            tree = copy.deepcopy(base)
            for path, fixed in {**context, key: value}.items():
                _set_path(tree, path, fixed)
            try:
                FluxoSettings.model_validate(tree)
            except ValidationError as error:
                problems = _problems(error)
                unknown = any(e["type"] == "extra_forbidden" for e in error.errors())
                hint = (
                    "not a setting; keys are dotted setting paths such as train.learning_rate, "
                    "train.optimizer or model.params.channels (see pipelines/settings)"
                    if unknown
                    else f"the value {value!r} is refused"
                )
                raise FluxoError(f"tune.space[{key!r}]: {hint} ({problems})") from error


def _builder_arguments(model_name: str) -> set[str] | None:
    """Keyword arguments a registered builder takes, or None when it takes any (``**config``)."""
    from models import MODEL_REGISTRY

    if model_name not in MODEL_REGISTRY:
        return None  # training reports the unknown model with the registered names
    parameters = MODEL_REGISTRY[model_name].parameters()
    return None if parameters is None else set(parameters)


# ---------------------------------------------------------------- the study


def build_pruner(tune_settings: TuneSettings) -> optuna.pruners.BasePruner:
    import optuna

    if tune_settings.pruner == "none":
        return optuna.pruners.NopPruner()
    # Steps are 1-based epochs: warmup_epochs=2 keeps epochs 1 and 2 safe from pruning.
    return optuna.pruners.MedianPruner(
        n_startup_trials=tune_settings.startup_trials, n_warmup_steps=tune_settings.warmup_epochs + 1
    )


def suggest(trial: optuna.trial.Trial, space: dict[str, ParamSpace], base: FluxoSettings) -> dict[str, Any]:
    """Sample the space in order; a conditional key is sampled only when its ``when`` holds."""
    tree = _settings_dict(base)
    chosen: dict[str, Any] = {}
    for key, spec in space.items():
        if not _when_holds(spec.when, chosen, tree):
            continue
        if spec.choices is not None:
            chosen[key] = trial.suggest_categorical(key, spec.choices)
        elif spec.integer:
            chosen[key] = trial.suggest_int(key, int(spec.low), int(spec.high), log=spec.log)  # type: ignore[arg-type]
        else:
            chosen[key] = trial.suggest_float(key, spec.low, spec.high, log=spec.log)  # type: ignore[arg-type]
    return chosen


def _train_trial(
    root: Path, settings: FluxoSettings, data_version: DataVersion, run_id: str,
    on_epoch: Callable[[int, dict[str, float]], None],
) -> tuple[dict[str, Any], dict[str, float], Path, Any]:
    from pipelines.train.run import train_and_evaluate
    from pipelines.train.tracker import MLflowTracker

    # The baseline answers "is this model worth it?" once per run, not once per trial.
    settings = settings.model_copy(update={"train": settings.train.model_copy(update={"baseline_epochs": 0})})
    return train_and_evaluate(root, settings, data_version, MLflowTracker(), run_key=run_id, on_epoch=on_epoch)


def tune(
    root: Path,
    settings: FluxoSettings,
    tune_settings: TuneSettings,
    data_version: DataVersion,
    *,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> TuneResult:
    """Run the study on the dataset under ``root`` as one MLflow run with a nested run per trial.

    ``sampler`` and ``pruner`` replace the ones ``tune_settings`` describe (TPE seeded
    with ``seed``; median or none), for callers that want another Optuna strategy.
    """
    import matplotlib.pyplot as plt
    import mlflow
    import optuna

    from pipelines.data.store import read_dataset
    from pipelines.tracking import configure_mlflow
    from pipelines.train.run import resolve_model

    root = Path(root)
    validate_space(settings, tune_settings)
    if tune_settings.metric != settings.train.monitor:
        log.warning(
            "tune.metric=%s but train.monitor=%s: each trial keeps, and is scored at, the epoch with the best %s; "
            "set train.monitor=%s to score the epoch with the best %s",
            tune_settings.metric, settings.train.monitor, settings.train.monitor,
            tune_settings.metric, tune_settings.metric,
        )
    dataset = read_dataset(root / settings.data.data_dir)
    dataset_name = dataset.manifest["name"]
    settings, chosen = resolve_model(settings, dataset)  # an unset model.name: chosen once, for every trial
    if chosen is not None:
        validate_space(settings, tune_settings)  # model.params.* against the model now known
    configure_mlflow(root, settings)
    # Optuna narrates every trial through its own handler; fluxo logs one line per trial itself.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()

    metric = tune_settings.metric
    study = optuna.create_study(
        direction=tune_settings.direction,
        sampler=sampler or optuna.samplers.TPESampler(seed=tune_settings.seed),
        pruner=pruner or build_pruner(tune_settings),
        study_name=f"tune-{dataset_name}-{settings.model.name}",
    )
    started = time.perf_counter()

    def objective(trial: optuna.trial.Trial) -> float:
        params = suggest(trial, tune_settings.space, settings)
        trial_settings = apply_params(settings, params)
        run = mlflow.start_run(run_name=f"trial-{trial.number}", nested=True)
        run_id = run.info.run_id
        trial.set_user_attr("run_id", run_id)
        status = "FAILED"
        try:
            mlflow.set_tags({"fluxo.tune.role": "trial", "fluxo.tune.trial": str(trial.number)})
            mlflow.log_params({f"tune.{k}": v for k, v in params.items()})

            reached = {"epoch": 0}

            def on_epoch(epoch: int, record: dict[str, float]) -> None:
                value = float(record[metric])
                trial.report(value, epoch)
                reached["epoch"] = epoch
                trial.set_user_attr("epochs", epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"trial {trial.number} pruned at epoch {epoch}: {metric} {value:.4f}")

            try:
                _, test_metrics, _, result = _train_trial(root, trial_settings, data_version, run_id, on_epoch)
            except optuna.TrialPruned:
                mlflow.set_tags({"fluxo.tune.state": "pruned", "fluxo.tune.pruned_at_epoch": str(reached["epoch"])})
                # A pruned run stopped on purpose: KILLED keeps it out of "newest finished run" look-ups.
                status = "KILLED"
                log.info("trial %d pruned at epoch %d %s", trial.number, reached["epoch"], params)
                raise
            value = float(result.history[result.best_epoch - 1][metric])
            trial.set_user_attr("test_accuracy", test_metrics.get("test_accuracy"))
            state = "complete" if math.isfinite(value) else "failed"
            mlflow.set_tag("fluxo.tune.state", state)
            mlflow.log_metric("tune_objective", value)
            status = "FINISHED"
            log.info("trial %d: %s %.4f (epoch %d) %s", trial.number, metric, value, result.best_epoch, params)
            return value  # NaN (diverged) makes Optuna mark the trial failed and go on
        finally:
            mlflow.end_run(status=status)
            # Trials are not resumed one by one; their resumable state would only mislead `--resume`.
            shutil.rmtree(root / trial_settings.train.checkpoint_dir / run_id / "state", ignore_errors=True)

    with mlflow.start_run(run_name=f"tune-{dataset_name}-{settings.model.name}") as parent:
        mlflow.set_tags(
            {"fluxo.tune.role": "study", "data_version": data_version.md5, "dataset": dataset_name,
             "model": settings.model.name}
        )
        mlflow.log_params(
            {
                "tune.trials": tune_settings.trials,
                "tune.timeout_s": tune_settings.timeout_s,
                "tune.metric": metric,
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
        study.optimize(objective, n_trials=tune_settings.trials, timeout=tune_settings.timeout_s)
        seconds = time.perf_counter() - started
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

        if counts["complete"] == 0:
            raise FluxoError(
                f"no trial of {len(rows)} completed ({counts['pruned']} pruned, {counts['failed']} failed); "
                "widen tune.space, raise tune.trials or tune.startup_trials, or set tune.pruner=none"
            )
        best = study.best_trial
        best_params = dict(best.params)
        result = TuneResult(
            best_params=best_params,
            best_value=float(best.value),  # type: ignore[arg-type]
            best_settings=apply_params(settings, best_params),
            parent_run_id=parent.info.run_id,
            trials=rows,
            metric=metric,
            best_trial=best.number,
            best_run_id=best.user_attrs.get("run_id", ""),
            seconds=seconds,
            counts=counts,
        )
        mlflow.log_params({f"best.{k}": v for k, v in best_params.items()})
        mlflow.log_metric(f"best_{metric}", result.best_value)
        mlflow.set_tags({"fluxo.tune.best_trial": str(best.number), "fluxo.tune.best_run_id": result.best_run_id})
        with tempfile.TemporaryDirectory() as scratch:
            preset = write_best_preset(result, Path(scratch) / "best_preset.yaml")
            mlflow.log_artifact(str(preset), "tune")
    log.info(
        "study %s: best %s %.4f in trial %d of %d (%d pruned, %d failed, %.0f s) %s",
        result.parent_run_id, metric, result.best_value, best.number, len(rows),
        counts["pruned"], counts["failed"], seconds, best_params,
    )
    return result


# ---------------------------------------------------------------- reporting


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


# ---------------------------------------------------------------- the best configuration


def format_value(value: Any) -> str:
    """A value as ``--set`` reads it back (YAML): ``1.0e-05`` stays a float, ``adam`` a string."""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return text.removesuffix("...").strip()


def best_overrides(result: TuneResult) -> list[str]:
    """The best parameters as ``key=value`` strings for ``--set`` on top of the tuned preset."""
    return [f"{key}={format_value(value)}" for key, value in result.best_params.items()]


def preset_dict(settings: FluxoSettings, keep: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """What a preset must say to reproduce ``settings``: the non-default values, minus store locations.

    The dataset, the model name and each dotted key in ``keep`` (the tuned ones) are
    written even where they equal today's default, so the preset keeps its meaning if a
    default changes.
    """
    from pipelines.settings import FluxoSettings

    exclude: dict[str, Any] = {section: set(keys) for section, keys in _LOCATION_KEYS.items()}
    if "tune" in FluxoSettings.model_fields:
        exclude["tune"] = True
    changed = settings.model_dump(mode="json", exclude_defaults=True, exclude=exclude)
    full = settings.model_dump(mode="json")
    preset: dict[str, Any] = {}
    for path in [".".join(p) for p in _ALWAYS_WRITTEN] + list(keep):
        value = _get_path(full, path)
        if value is not None:
            _set_path(preset, path, value)
    preset = _ordered_like(merge_tree(preset, changed), full)
    return {section: values for section, values in preset.items() if values}


def _ordered_like(tree: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """``tree``'s keys in the order ``reference`` (a full dump) has them: sections read as in config.py."""
    order = {key: index for index, key in enumerate(reference)}
    ordered = sorted(tree, key=lambda key: order.get(key, len(order)))
    return {
        key: _ordered_like(tree[key], reference[key])
        if isinstance(tree[key], dict) and isinstance(reference.get(key), dict)
        else tree[key]
        for key in ordered
    }


def write_best_preset(result: TuneResult, path: Path) -> Path:
    """Write the best trial's configuration as a preset: ``fluxo run --config PATH`` trains and exports it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Best of fluxo tune study {result.parent_run_id}: {result.metric} {result.best_value:.4f} "
        f"in trial {result.best_trial} (run {result.best_run_id}).\n"
        f"# Tuned: {', '.join(best_overrides(result))}\n"
        f"# Train, export and register it: fluxo run --config {path}\n"
    )
    body = yaml.safe_dump(preset_dict(result.best_settings, list(result.best_params)), sort_keys=False)
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(header + body)
    scratch.replace(path)
    return path


__all__ = [
    "ParamSpace", "TuneResult", "TuneSettings", "apply_params", "best_overrides", "build_pruner",
    "preset_dict", "tune", "validate_space", "write_best_preset",
]
