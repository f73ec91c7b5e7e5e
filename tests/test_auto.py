"""`model.name: auto`: a shrunk race on digits picks a model, records every candidate, and is exported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.data.ingest import ingest, version
from pipelines.data.store import read_dataset
from pipelines.errors import FluxoError
from pipelines.export.package import latest_run_id
from pipelines.export.step import export_run
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
    result = train(project, settings, version(project, settings.data))
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
    exported = export_run(project, settings, result.run_id)
    assert exported.promotion.alias == "champion"


def test_auto_is_deterministic_for_a_seed(project: Path, settings_for) -> None:
    settings = settings_for(*SHRUNK, "auto.models=[]", "train.epochs=2")  # the baseline alone: fast
    ingest(project, settings.data)
    data_version = version(project, settings.data)
    first = train(project, settings, data_version)
    second = train(project, settings, data_version)
    assert first.test_metrics == second.test_metrics
