"""Hyper-parameter search: real Optuna, real MLflow (SQLite in tmp_path), the digits smoke preset."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.context import open_run
from pipelines.settings import load_settings, parse_override
from pipelines.data.ingest import ingest, version
from pipelines.errors import FluxoError
from pipelines.train.tune import (
    ParamSpace,
    TuneSettings,
    apply_params,
    best_overrides,
    build_pruner,
    suggest,
    tune,
    validate_space,
    write_best_preset,
)

REPO = Path(__file__).resolve().parents[2]


def _tune_settings(**changes) -> TuneSettings:
    return TuneSettings.model_validate(
        {
            "trials": 3,
            "seed": 0,
            "space": {
                "train.learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
                "model.params.channels": {"choices": [4, 8]},
            },
            **changes,
        }
    )


@pytest.fixture
def ingested(project: Path, settings_for):
    settings = settings_for("data.push=false")
    ingest(project, settings.data)
    return settings, version(project, settings.data)


def _child_runs(parent_id: str) -> list:
    parent = mlflow.get_run(parent_id)
    return mlflow.search_runs(
        experiment_ids=[parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
        output_format="list",
    )


def test_study_records_each_trial_as_a_nested_run_and_writes_a_runnable_best_preset(
    project: Path, ingested, tmp_path: Path
) -> None:
    settings, data_version = ingested
    result = tune(open_run(project, settings), _tune_settings(pruner="none"), data_version)

    children = _child_runs(result.parent_run_id)
    assert len(children) == 3 == len(result.trials)
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["fluxo.tune.state"] == "complete"
        assert child.data.tags["data_version"] == data_version.md5
        sampled = float(child.data.params["tune.train.learning_rate"])
        assert 1e-3 <= sampled <= 1e-2
        assert float(child.data.params["train.learning_rate"]) == pytest.approx(sampled)
        channels = int(child.data.params["tune.model.params.channels"])
        assert json.loads(child.data.params["model.params"])["channels"] == channels
        assert len(MlflowClient().get_metric_history(child.info.run_id, "val_loss")) == 2  # one per epoch
        assert "test_accuracy" in child.data.metrics

    # The expectation, computed from what each trial's own run logged: its lowest val_loss over its epochs.
    lowest = {c.info.run_id: min(m.value for m in MlflowClient().get_metric_history(c.info.run_id, "val_loss"))
              for c in children}
    winner = min(lowest, key=lowest.get)
    winning = next(c for c in children if c.info.run_id == winner)
    assert len(set(lowest.values())) == 3  # distinct trials, so the winner is one run
    parent = mlflow.get_run(result.parent_run_id)
    assert parent.data.tags["fluxo.tune.role"] == "study"
    assert parent.data.metrics["best_val_loss"] == pytest.approx(lowest[winner], rel=1e-6)
    assert result.best_value == pytest.approx(lowest[winner], rel=1e-6) and result.best_run_id == winner
    assert parent.data.metrics["trials_complete"] == 3
    assert float(parent.data.params["best.train.learning_rate"]) == pytest.approx(
        float(winning.data.params["train.learning_rate"]))
    assert result.best_params == {"train.learning_rate": pytest.approx(float(winning.data.params["train.learning_rate"])),
                                  "model.params.channels": int(winning.data.params["tune.model.params.channels"])}
    artifacts = {a.path for a in MlflowClient().list_artifacts(result.parent_run_id, "tune")}
    assert {"tune/trials.csv", "tune/trials.json", "tune/best_preset.yaml"} <= artifacts
    assert [a.path for a in MlflowClient().list_artifacts(result.parent_run_id, "plots")] == [
        "plots/optimization_history.png"
    ]
    assert {row["run_id"]: row["value"] for row in result.trials} == pytest.approx(lowest, rel=1e-6)
    assert {row["run_id"]: row["state"] for row in result.trials} == dict.fromkeys(lowest, "complete")

    assert result.best_settings.model.params["channels"] == result.best_params["model.params.channels"]
    assert result.best_settings.train.learning_rate == result.best_params["train.learning_rate"]
    assert result.best_settings.tracking.tracking_uri == settings.tracking.tracking_uri

    preset = write_best_preset(result, tmp_path / "best.yaml")
    reloaded = load_settings(preset)
    assert reloaded.train.learning_rate == result.best_params["train.learning_rate"]
    assert reloaded.model.params == {"channels": result.best_params["model.params.channels"], "dropout": 0.0}
    assert reloaded.train.epochs == 2 and reloaded.data.dataset == "digits"
    # Store locations stay with whoever runs the preset.
    assert "tracking_uri" not in preset.read_text() and "dvc_remote" not in preset.read_text()
    overridden = load_settings(REPO / "configs" / "smoke.yaml", best_overrides(result))
    assert overridden.train.learning_rate == result.best_params["train.learning_rate"]
    assert overridden.model.params["channels"] == result.best_params["model.params.channels"]


def test_a_hopeless_trial_is_pruned_and_recorded(project: Path, ingested, settings_for) -> None:
    _, data_version = ingested
    settings = settings_for("data.push=false", "train.monitor=val_accuracy", "train.epochs=3")
    tune_settings = _tune_settings(
        metric="val_accuracy", space={"train.learning_rate": {"choices": [0.01, 1e-9]}}
    )
    # Both rates, in either order. After two epochs 0.01 reaches about 0.7 validation accuracy
    # while 1e-9 stays at chance (about 0.1), so the threshold stops it before its third.
    grid = optuna.samplers.GridSampler({"train.learning_rate": [0.01, 1e-9]}, seed=0)
    result = tune(
        open_run(project, settings), tune_settings, data_version,
        sampler=grid, pruner=optuna.pruners.ThresholdPruner(lower=0.3, n_warmup_steps=2),
    )
    states = {row["train.learning_rate"]: row["state"] for row in result.trials}
    assert states == {0.01: "complete", 1e-9: "pruned"}
    assert result.best_params == {"train.learning_rate": 0.01} and result.counts["pruned"] == 1

    pruned = [r for r in _child_runs(result.parent_run_id) if r.data.tags["fluxo.tune.state"] == "pruned"]
    assert len(pruned) == 1
    assert pruned[0].info.status == "KILLED" and pruned[0].data.tags["fluxo.tune.pruned_at_epoch"] == "2"
    assert len(MlflowClient().get_metric_history(pruned[0].info.run_id, "val_accuracy")) == 2
    assert "test_accuracy" not in pruned[0].data.metrics  # stopped before evaluation
    # A pruned trial leaves nothing for `fluxo train --resume` to pick up.
    assert not (project / settings.train.checkpoint_dir / pruned[0].info.run_id / "state").exists()


def test_median_pruner_follows_the_settings() -> None:
    def worse_trial_pruned(tune_settings: TuneSettings) -> list[bool]:
        study = optuna.create_study(pruner=build_pruner(tune_settings))
        reference = study.ask()
        for epoch in (1, 2):
            reference.report(0.1, epoch)
        study.tell(reference, 0.1)
        worse = study.ask()
        verdicts = []
        for epoch in (1, 2):
            worse.report(0.9, epoch)
            verdicts.append(worse.should_prune())
        return verdicts

    assert worse_trial_pruned(TuneSettings(startup_trials=1, warmup_epochs=0)) == [True, True]
    assert worse_trial_pruned(TuneSettings(startup_trials=1, warmup_epochs=1)) == [False, True]
    assert worse_trial_pruned(TuneSettings(startup_trials=2, warmup_epochs=0)) == [False, False]
    assert worse_trial_pruned(TuneSettings(pruner="none", startup_trials=0, warmup_epochs=0)) == [False, False]


@pytest.mark.parametrize(
    ("key", "spec", "named"),
    [
        ("train.learnig_rate", {"low": 1e-4, "high": 1e-2}, "not a setting"),
        ("trian.learning_rate", {"low": 1e-4, "high": 1e-2}, "not a setting"),
        ("train.epochs.max", {"choices": [1, 2]}, "train.epochs is a single setting"),
        ("train.optimizer", {"choices": ["adam", "lbfgs"]}, "'lbfgs' is refused"),
        ("train.learning_rate", {"low": 0, "high": 1e-2}, "0.0 is refused"),
        ("model.params.width", {"choices": [8, 16]}, "takes no argument 'width'"),
    ],
)
def test_a_bad_space_is_refused_naming_the_key(settings_for, key: str, spec: dict, named: str) -> None:
    settings = settings_for()
    with pytest.raises(FluxoError, match=rf"tune\.space\['{key}'\]") as error:
        validate_space(settings, TuneSettings(space={key: ParamSpace.model_validate(spec)}))
    assert named in str(error.value)


def test_tune_refuses_a_bad_key_before_touching_data_or_mlflow(project: Path) -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    db = project.parent / "mlflow.db"
    result = CliRunner().invoke(app, ["tune", "--root", str(project), "--set", f"tracking.tracking_uri=sqlite:///{db}",
                                      "--set", "tune.space={train.lr: {low: 0.0001, high: 0.01}}"])
    assert result.exit_code == 2 and "tune.space['train.lr']: not a setting" in result.output, result.output
    assert not db.exists() and not (project / "data").exists()


@pytest.mark.parametrize(
    "spec",
    [{"low": 1, "choices": [1]}, {"low": 1}, {"low": 2, "high": 1}, {"low": 0, "high": 1, "log": True},
     {"low": 0.5, "high": 4, "int": True}, {"choices": []}, {"low": 0, "high": 1, "step": 0.1}],
)
def test_param_space_shapes(spec: dict) -> None:
    with pytest.raises(ValueError):
        ParamSpace.model_validate(spec)


def test_conditional_keys_are_sampled_only_when_their_condition_holds(settings_for) -> None:
    settings = settings_for()
    space = TuneSettings.model_validate(
        {"space": {"train.optimizer": {"choices": ["adam", "sgd"]},
                   "train.momentum": {"choices": [0.9], "when": {"train.optimizer": "sgd"}}}}
    ).space
    validate_space(settings, TuneSettings(space=space))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        params = suggest(study.ask(), space, settings)
        trial_settings = apply_params(settings, params)
        assert ("train.momentum" in params) == (params["train.optimizer"] == "sgd")
        assert trial_settings.train.momentum == (0.9 if params["train.optimizer"] == "sgd" else 0.0)
        seen.add(params["train.optimizer"])
    assert seen == {"adam", "sgd"}
    typo = {**space, "train.momentum": space["train.momentum"].model_copy(update={"when": {"train.optimizer": "sdg"}})}
    with pytest.raises(FluxoError, match="train.optimizer is never 'sdg' in the space"):
        validate_space(settings, TuneSettings(space=typo))
    unknown = {"train.momentum": space["train.momentum"].model_copy(update={"when": {"train.optimiser": "sgd"}})}
    with pytest.raises(FluxoError, match=r"when: train.optimiser='sgd' is not a setting"):
        validate_space(settings, TuneSettings(space=unknown))
    backwards = dict(reversed(list(space.items())))
    with pytest.raises(FluxoError, match="move train.optimizer above train.momentum"):
        validate_space(settings, TuneSettings(space=backwards))


def test_overrides_round_trip_through_set() -> None:
    from pipelines.train.tune import TuneResult

    result = TuneResult(
        best_params={"train.learning_rate": 1e-05, "train.optimizer": "adamw", "model.params.channels": 32,
                     "model.params.batch_norm": False},
        best_value=0.1, best_settings=None, parent_run_id="x", trials=[],  # type: ignore[arg-type]
    )
    parsed = {".".join(parse_override(text)[0]): parse_override(text)[1] for text in best_overrides(result)}
    assert parsed == result.best_params
    assert type(parsed["train.learning_rate"]) is float


def test_the_tune_preset_is_a_valid_search(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "configs" / "digits-cnn-tune.yaml").read_text())
    tune_settings = TuneSettings.model_validate(raw.pop("tune"))
    # Until FluxoSettings has a tune section, load the rest as a preset of its own.
    training = tmp_path / "digits-cnn.yaml"
    training.write_text(yaml.safe_dump(raw))
    settings = load_settings(training)
    validate_space(settings, tune_settings)
    assert tune_settings.space["train.learning_rate"].log
    digits = load_settings(REPO / "configs" / "digits-cnn.yaml")
    assert settings.model_dump() == digits.model_dump()  # the same training, plus a search
