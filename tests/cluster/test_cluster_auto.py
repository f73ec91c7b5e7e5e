"""`model.name: auto` on a Ray cluster started in the process: each rung's candidates train at once, each a
nested MLflow run of the search; a trial whose worker dies is retried, and one that keeps dying is marked
FAILED and left out of the ranking, never dropped in silence."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import make_settings, store_client
from tests.users import Project

pytestmark = pytest.mark.slow  # a Ray cluster and a race per test: a minute each

RACE = ("--set", "model.name=auto", "--set", "train.epochs=4", "--set", "auto.models=[cnn2d]",
        "--set", "auto.learning_rates=[0.003]", "--set", "auto.eta=2", "--set", "auto.with_presets=false")


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Project:
    user = Project.clone_shaped(tmp_path_factory.mktemp("cluster-auto"))
    stores = user.root.parent
    user.stores = ("--set", f"tracking.tracking_uri=sqlite:///{stores / 'mlflow.db'}",  # type: ignore[attr-defined]
                   "--set", f"data.dvc_remote={stores / 'dvc-remote'}")
    ingested = user.fluxo("data", "ingest", "--config", "configs/smoke.yaml", *user.stores)  # type: ignore[attr-defined]
    assert ingested.returncode == 0, ingested.stderr[-3000:]
    return user


def test_the_race_trains_each_rung_at_once_and_every_candidate_is_a_nested_run(user: Project) -> None:
    result = user.fluxo("train", "--config", "configs/smoke.yaml", *RACE, "--set", "cluster.address=local",
                        "--set", "cluster.cpus=2", *user.stores)  # type: ignore[attr-defined]
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "4 candidate(s) training at once on the cluster" in output, output[-4000:]
    client = store_client(user.root.parent / "mlflow.db")
    final = client.get_run(json.loads(result.stdout[result.stdout.index("{"):])["run_id"])
    search = client.get_run(final.data.tags["fluxo.auto.search"])
    nested = client.search_runs([search.info.experiment_id], f"tags.mlflow.parentRunId = '{search.info.run_id}'")
    # 4 candidates at 1 epoch, the best 2 at 2 epochs, the best at 4: 7 nested runs, as in one process.
    assert len(nested) == 7 and {r.data.tags["fluxo.kind"] for r in nested} == {"auto-candidate"}
    assert {r.info.status for r in nested} == {"FINISHED"}
    assert all("val_accuracy" in r.data.metrics for r in nested), "each trial logs its epochs into its own run"
    first_rung = [r for r in nested if r.data.params["auto.epochs"] == "1"]
    spans = sorted((r.info.start_time, r.info.end_time) for r in first_rung)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), f"no two trials overlapped: {spans}"
    assert final.data.params["model.name"] == json.loads(
        Path(client.download_artifacts(search.info.run_id, "auto/leaderboard.json")).read_text()
    )["leaderboard"][0]["candidate"].split("(")[0]


# --- trials whose worker dies: a stand-in for training, run on real Ray workers -------------------------------


def _fit(score: float) -> tuple[Any, Any, Any, Any]:
    return None, None, None, SimpleNamespace(history=[{"val_accuracy": score, "val_loss": 1 - score}])


def dies_once(root: Path, settings: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
    """The first attempt's process dies, as when a node is lost; the retry trains."""
    marker = Path(root) / f"died-{settings.model.params['channels']}"
    if not marker.exists():
        marker.touch()
        os._exit(1)
    return _fit(0.5)


def always_dies(root: Path, settings: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
    if settings.model.params.get("channels") == 16:
        os._exit(1)
    return _fit(0.25)


def _train_all(root: Path, train: Any) -> list[Any]:
    import mlflow

    from pipelines.cluster import ray_cluster
    from pipelines.context import open_run
    from pipelines.data.store import read_dataset
    from pipelines.train.auto import Candidate
    from pipelines.train.spread import ClusterTrainer

    settings = make_settings(root, "cluster.address=local", "cluster.cpus=2")
    open_run(root, settings)  # MLflow at this project's store and experiment (not an earlier test's)
    candidates = [Candidate("cnn2d", {"channels": width}, 0.003, False) for width in (16, 32)]
    with ray_cluster(settings.cluster), mlflow.start_run(run_name="search"):
        trainer = ClusterTrainer(root, settings, None, read_dataset(root / settings.data.data_dir), train)
        trainer.train_all(candidates, 1, lambda: False)
    return candidates


def test_a_trial_whose_worker_dies_is_retried_and_one_that_keeps_dying_is_marked_failed(user: Project) -> None:
    retried = _train_all(user.root, dies_once)
    assert [c.scores for c in retried] == [{1: 0.5}, {1: 0.5}], "both trials finished on their retry"
    assert sorted(p.name for p in user.root.glob("died-*")) == ["died-16", "died-32"]
    lost, kept = _train_all(user.root, always_dies)
    assert lost.scores == {} and kept.scores == {1: 0.25}, "the lost trial is out of the ranking, the other in"
    client = store_client(user.root.parent / "mlflow.db")
    run = client.get_run(lost.run_ids[-1])
    assert run.info.status == "FAILED" and "attempts" in run.data.tags["fluxo.auto.failed"], run.data.tags
    assert client.get_run(kept.run_ids[-1]).info.status == "FINISHED"


def test_a_study_runs_its_trials_at_once_each_a_nested_run_of_the_study(user: Project) -> None:
    result = user.fluxo("tune", "--config", "configs/digits-cnn-tune.yaml", "--trials", "4", "--set", "train.epochs=2",
                        "--set", "tune.startup_trials=1", "--set", "cluster.address=local", "--set", "cluster.cpus=2",
                        *user.stores)  # type: ignore[attr-defined]
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "up to 2 trial(s) at once on the cluster" in output, output[-4000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert sum(summary["trials"].values()) == 4 and (user.root / summary["preset"]).is_file(), summary
    client = store_client(user.root.parent / "mlflow.db")
    trials = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "tags.`fluxo.tune.role` = 'trial'")
    parents = {r.data.tags.get("mlflow.parentRunId") for r in trials}
    assert len(trials) == 4 and len(parents) == 1 and None not in parents, [r.data.tags for r in trials]
    study = client.get_run(parents.pop())
    assert study.data.metrics["trials_complete"] + study.data.metrics.get("trials_pruned", 0) == 4
    spans = sorted((r.info.start_time, r.info.end_time) for r in trials)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), f"no two trials overlapped: {spans}"


def refuses(root: Path, settings: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
    import uuid

    from pipelines.errors import FluxoError

    (Path(root) / f"refused-{uuid.uuid4().hex}").touch()  # one file per attempt
    raise FluxoError("train.nope: a mistake of the user's, found inside the trial")


def test_a_users_mistake_inside_a_trial_is_raised_as_itself_not_retried(user: Project) -> None:
    from pipelines.errors import FluxoError

    with pytest.raises(FluxoError, match=r"^train.nope: a mistake of the user's, found inside the trial$"):
        _train_all(user.root, refuses)
    assert len(list(user.root.glob("refused-*"))) <= 2, "a trial's own error is never retried"
