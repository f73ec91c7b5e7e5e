"""DDP: `fluxo train --nproc 2` (torchrun, gloo on the CPU) takes the same steps as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.data.ingest import ingest, version
from pipelines.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.e2e


def _train(project: Path, tmp_path: Path, *extra: str) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "FLUXO_DATA__DVC_REMOTE": str(tmp_path / "dvc-remote"), "OMP_NUM_THREADS": "1",
           "MLFLOW_LOGGING_LEVEL": "WARNING"}
    recipe = ["--set", "model.name=mlp", "--set", "model.params={hidden: 64}",
              "--set", "train.epochs=3", "--set", "train.batch_size=64", "--set", "train.learning_rate=0.05",
              # SGD: Adam's normalised step turns float-level gradient noise into lr-sized moves.
              "--set", "train.optimizer=sgd", "--set", "train.momentum=0.9"]
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--root", str(project), *recipe, *extra],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout[done.stdout.index("{"):])


def test_two_processes_match_one(project: Path, settings_for, tmp_path: Path) -> None:
    settings = settings_for()
    ingest(project, settings.data)
    version(project, settings.data)
    single = _train(project, tmp_path)
    double = _train(project, tmp_path, "--nproc", "2")

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(double["run_id"]).data.tags["world_size"] == "2"
    assert client.get_run(single["run_id"]).data.tags["world_size"] == "1"
    # Only rank 0 wrote checkpoints and opened a run.
    runs_dir = project / ".fluxo" / "checkpoints"
    assert {d.name for d in runs_dir.iterdir()} == {single["run_id"], double["run_id"]}
    assert len(client.search_runs([client.get_run(single["run_id"]).info.experiment_id])) == 2

    one = load_checkpoint(runs_dir / single["run_id"] / "best.pt")["state_dict"]
    two = load_checkpoint(runs_dir / double["run_id"] / "best.pt")["state_dict"]
    # Not bit-identical: each rank averages over its half of a batch (odd batches split unevenly) and
    # the all-reduce sums in another order.
    for key in one:
        difference = (two[key] - one[key]).abs()
        # Without gradient averaging (plain per-rank training) this mean is ~1e-2.
        assert difference.max() < 1e-2 and difference.mean() < 1e-3, (key, difference.max(), difference.mean())
    assert abs(double["test_accuracy"] - single["test_accuracy"]) <= 0.01
