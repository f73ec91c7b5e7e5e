"""`model.name: auto`: a shrunk race on digits picks a model, records every candidate, and is exported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.context import open_run
from pipelines.data.ingest import ingest, version
from pipelines.data.store import read_dataset
from pipelines.errors import FluxoError
from pipelines.export.package import latest_run_id
from pipelines.release import export_run
from pipelines.train.auto import portfolio
from pipelines.train.run import train

SHRUNK = ("model.name=auto", "train.epochs=4", "auto.models=[cnn2d]", "auto.learning_rates=[0.003]",
          "auto.first_epochs=1", "auto.eta=2", "auto.with_presets=false")


def test_the_portfolio_fits_the_input_kind_and_always_holds_the_baseline(project: Path, settings_for) -> None:
    settings = settings_for("auto.models=[cnn2d]", "auto.learning_rates=[0.001, 0.003]", "auto.with_presets=false")
    ingest(project, settings.data)
    dataset = read_dataset(project / "data")
    candidates = portfolio(settings, dataset)
    assert {c.model for c in candidates} == {"mlp", "cnn2d"}  # asked for cnn2d; the MLP baseline is added
    assert len(candidates) == 4 * 2  # 2 widths each x 2 learning rates; the smoke preset does not augment
    every = portfolio(settings_for(), dataset)
    assert {c.model for c in every} == {"mlp", "cnn2d", "lenet", "resnet_small"}  # image models only
    # The shipped image presets race too, each with its own recipe; smoke and tuning presets do not.
    presets = {c.name: c for c in every if c.preset is not None}
    assert set(presets) == {"digits-cnn.yaml", "mnist-cnn.yaml", "mnist-lenet.yaml"}
    assert presets["mnist-cnn.yaml"].augment and presets["mnist-cnn.yaml"].preset["train"]["scheduler"] == "onecycle"
    from pipelines.train.auto import candidate_settings

    raced = candidate_settings(settings, presets["mnist-lenet.yaml"], 2)
    assert (raced.model.name, raced.train.epochs, raced.train.learning_rate) == ("lenet", 2, 0.002)
    assert raced.augment.image.rotation == (-10.0, 10.0)  # the preset's own augmentation (rotation: 10)
    final = candidate_settings(settings, presets["mnist-lenet.yaml"], None)
    assert (final.train.epochs, final.train.patience) == (40, 8)  # the winner trains to the preset's end
    with pytest.raises(FluxoError, match="auto.models: nope not registered"):
        portfolio(settings_for("auto.models=[nope]"), dataset)


def test_auto_races_records_every_candidate_and_exports_the_winner(project: Path, settings_for) -> None:
    settings = settings_for(*SHRUNK)
    ingest(project, settings.data)
    result = train(open_run(project, settings), version(project, settings.data))
    client = MlflowClient()
    final = client.get_run(result.run_id)
    search = client.get_run(final.data.tags["fluxo.auto.search"])
    assert search.data.tags["fluxo.kind"] == "auto-search"
    nested = client.search_runs([search.info.experiment_id], f"tags.mlflow.parentRunId = '{search.info.run_id}'")
    # 4 candidates at 1 epoch, the best 2 at 2 epochs, the best at 4: 7 nested runs.
    assert len(nested) == 7 and {r.data.tags["fluxo.kind"] for r in nested} == {"auto-candidate"}
    board = json.loads(Path(client.download_artifacts(search.info.run_id, "auto/leaderboard.json")).read_text())
    rows = board["leaderboard"]
    assert rows[0]["role"].startswith("winner") and any("baseline" in r["role"] for r in rows)
    winner = rows[0]["candidate"].split("(")[0]
    assert final.data.params["model.name"] == winner  # the winner's configuration trained as a normal run
    assert final.data.metrics["epochs_run"] <= 4
    assert latest_run_id(settings.tracking.experiment) == result.run_id  # export never takes a search run
    exported = export_run(open_run(project, settings), result.run_id)
    assert exported.promotion.alias == "champion"


def test_auto_is_deterministic_for_a_seed(project: Path, settings_for) -> None:
    settings = settings_for(*SHRUNK, "auto.models=[]", "train.epochs=2")  # the baseline alone: fast
    ingest(project, settings.data)
    data_version = version(project, settings.data)
    first = train(open_run(project, settings), data_version)
    second = train(open_run(project, settings), data_version)
    assert first.test_metrics == second.test_metrics


def _candidate(model: str, preset: bool = False, scores: dict[int, float] | None = None,
               full: tuple[int, float] | None = None):
    from pipelines.train.auto import Candidate

    return Candidate(model, {}, 1e-3, False, preset={"model": {}, "train": {}, "augment": {}} if preset else None,
                     name=f"{model}.yaml" if preset else "", scores=scores or {}, full=full)


def test_the_ranking_meets_finished_presets_with_the_grid_leader_and_a_tie_goes_to_the_preset() -> None:
    from pipelines.train.auto import rank

    baseline = _candidate("mlp", scores={1: 0.80})
    leader = _candidate("cnn2d", scores={1: 0.85, 3: 0.90}, full=(12, 0.95))
    runner_up = _candidate("lenet", scores={1: 0.86, 3: 0.89})
    preset = _candidate("resnet_small", preset=True, full=(30, 0.95))
    unfinished_preset = _candidate("gru", preset=True)  # the budget ran out before it trained
    ranked = rank([baseline, leader, runner_up, preset, unfinished_preset])
    assert ranked == [preset, leader, runner_up, baseline]  # a tie: the tuned recipe stays
    better = _candidate("cnn2d", scores={1: 0.85, 3: 0.90}, full=(12, 0.96))
    assert rank([baseline, better, runner_up, preset])[:2] == [better, preset]
    # A budget that binds before the leader finishes: it competes with the rung it reached.
    stopped = _candidate("cnn2d", scores={1: 0.85, 3: 0.97})
    assert rank([baseline, stopped, preset])[0] is stopped
    # Within the grid, a higher rung ranks first even at a lower score: the rest follow the contenders.
    early = _candidate("lenet", scores={1: 0.99})
    assert rank([baseline, early, stopped]) == [stopped, early, baseline]


def test_a_preset_in_the_race_trains_its_own_recipe_to_completion(project: Path, settings_for, monkeypatch) -> None:
    import yaml

    import pipelines.train.auto as auto

    presets = project / "presets"
    presets.mkdir()
    (presets / "tiny-cnn.yaml").write_text(yaml.safe_dump({
        "model": {"name": "cnn2d", "params": {"channels": 8}},
        "train": {"epochs": 3, "patience": 3, "learning_rate": 0.004, "scheduler": "onecycle"}}))
    (presets / "digits-tiny.yaml").write_text(yaml.safe_dump({  # tuned for this run's dataset
        "data": {"dataset": "digits"}, "model": {"name": "cnn2d", "params": {"channels": 4}}, "train": {"epochs": 2}}))
    monkeypatch.setattr(auto, "PRESETS", presets)
    settings = settings_for(*SHRUNK, "train.epochs=2", "train.clip_norm=5", "auto.with_presets=true")
    ingest(project, settings.data)
    result = train(open_run(project, settings), version(project, settings.data))
    client = MlflowClient()
    search = client.get_run(client.get_run(result.run_id).data.tags["fluxo.auto.search"])
    nested = client.search_runs([search.info.experiment_id], f"tags.mlflow.parentRunId = '{search.info.run_id}'")
    raced = [r for r in nested if r.data.params.get("auto.preset") == "tiny-cnn.yaml"]
    assert len(raced) == 1  # trained once, never cut at the first rung
    assert raced[0].data.params["auto.epochs"] == "full" and raced[0].data.params["train.epochs"] == "3"
    assert raced[0].data.params["train.scheduler"] == "onecycle"
    assert raced[0].data.params["train.clip_norm"] == "None"  # the recipe's, not the run's: as `--config` trains it
    # This dataset's preset right after the grid's first rung; one tuned elsewhere after the halving.
    order = [r.data.params.get("auto.preset") if r.data.params.get("auto.preset") != "None"
             else f"grid {r.data.params['auto.epochs']}" for r in sorted(nested, key=lambda r: r.info.start_time)]
    first_rung = order.count("grid 1")
    assert order[:first_rung] == ["grid 1"] * first_rung and order[first_rung] == "digits-tiny.yaml"
    assert order[-1] == "tiny-cnn.yaml" and "grid full" in order[first_rung + 1:-1], order
    board = json.loads(Path(client.download_artifacts(search.info.run_id, "auto/leaderboard.json")).read_text())
    row = next(r for r in board["leaderboard"] if "tiny-cnn" in r["candidate"])
    assert row["finished"] and row["epochs"] == 3


def test_a_rung_left_with_one_candidate_trains_it_to_completion(project: Path, settings_for) -> None:
    """The halving can end with one candidate below the top rung: that leader is then trained to completion.

    Training is a stand-in here (each candidate's score is fixed by its width): the race's own steps, its
    MLflow runs and its ranking are real."""
    from pipelines.data.store import Dataset
    from pipelines.train.auto import race

    settings = settings_for("model.name=auto", "train.epochs=16", "auto.models=[cnn2d]", "auto.learning_rates=[0.003]",
                            "auto.first_epochs=1", "auto.eta=4", "auto.with_presets=false")
    calls: list[tuple[str, int]] = []

    def fake_training(root, trial_settings, data_version, tracker, run_key, dataset):  # noqa: ANN001 - a stand-in
        from types import SimpleNamespace

        width = trial_settings.model.params.get("channels") or trial_settings.model.params.get("hidden")
        calls.append((f"{trial_settings.model.name}{width}", trial_settings.train.epochs))
        history = [{"val_accuracy": width / 1000, "val_loss": 1.0}] * trial_settings.train.epochs
        return None, None, None, SimpleNamespace(history=history)

    open_run(project, settings)  # MLflow at this test's store and experiment (not an earlier test's)
    dataset = Dataset({"name": "digits", "kind": "image", "input_shape": [1, 8, 8], "labels": list("0123456789")}, {})
    ranked = race(project, settings, None, dataset, fake_training)
    # 4 candidates at 1 epoch; eta 4 keeps the best one (mlp hidden=512) for 4 epochs, where it is alone: it is
    # then trained to completion (train.epochs), not dropped.
    assert calls[:4] == [("mlp128", 1), ("mlp512", 1), ("cnn2d16", 1), ("cnn2d32", 1)]
    assert calls[4:] == [("mlp512", 4), ("mlp512", 16)]
    assert ranked[0].label.startswith("mlp(hidden=512)") and ranked[0].full == (16, 0.512)
