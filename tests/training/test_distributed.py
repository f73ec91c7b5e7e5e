"""DDP: `fluxo train --nproc 2` (torchrun, gloo on the CPU) takes the same steps as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.data.ingest import ingest, version
from pipelines.train.checkpoint import load_checkpoint, load_latest_state
from tests.waiting import wait_for

pytestmark = pytest.mark.e2e


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "FLUXO_DATA__DVC_REMOTE": str(tmp_path / "dvc-remote"), "OMP_NUM_THREADS": "1",
            "MLFLOW_LOGGING_LEVEL": "WARNING"}


def _command(project: Path, *extra: str, epochs: int = 3) -> list[str]:
    recipe = ["--set", "model.name=mlp", "--set", "model.params={hidden: 64}",
              "--set", f"train.epochs={epochs}", "--set", "train.batch_size=64", "--set", "train.learning_rate=0.05",
              # SGD: Adam's normalised step turns float-level gradient noise into lr-sized moves.
              "--set", "train.optimizer=sgd", "--set", "train.momentum=0.9"]
    return [sys.executable, "-m", "pipelines.cli", "train", "--root", str(project), *recipe, *extra]


def _train(project: Path, tmp_path: Path, *extra: str, epochs: int = 3) -> dict:
    done = subprocess.run(_command(project, *extra, epochs=epochs), env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
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


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc: torchrun starts each worker in a session of its own,
    so killing the launcher's process group would leave the workers training."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        children = parents.get(queue.pop(), [])
        found += children
        queue += children
    return found


def _freeze(launcher: subprocess.Popen) -> None:
    """SIGSTOP the CLI, torchrun and every rank: none moves on until :func:`_crash` kills them."""
    for pid in [launcher.pid, *_descendants(launcher.pid)]:
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass


def _crash(launcher: subprocess.Popen) -> None:
    """SIGKILL the CLI, torchrun and every rank at once: a machine losing power, no cleanup anywhere."""
    for pid in [launcher.pid, *_descendants(launcher.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher.wait(timeout=30)


@pytest.mark.slow  # 40 s: a SIGKILLed two-process run resumed; test_two_processes_match_one covers DDP by default
def test_resume_with_two_processes_matches_an_uninterrupted_run(project: Path, settings_for, tmp_path: Path) -> None:
    settings = settings_for()
    ingest(project, settings.data)
    version(project, settings.data)
    epochs = 8
    reference = _train(project, tmp_path, "--nproc", "2", epochs=epochs)
    runs_dir = project / ".fluxo" / "checkpoints"

    crashing = subprocess.Popen(_command(project, "--nproc", "2", epochs=epochs), env=_env(tmp_path),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def first_save() -> list[Path]:
        if crashing.poll() is not None:
            raise AssertionError(f"the run ended (exit {crashing.returncode}) before it could be interrupted")
        return [p for p in runs_dir.glob("*/state/state-*.pt") if p.parents[1].name != reference["run_id"]]

    run_dir = wait_for(first_save, "the first training-state save", timeout=240, interval=0.01)[0].parents[1]
    # Every process stopped where it stands, then checked, then killed: what is checked is what the kill leaves.
    _freeze(crashing)
    state, _ = load_latest_state(run_dir / "state")
    alive = crashing.poll() is None
    _crash(crashing)
    assert alive and crashing.returncode == -signal.SIGKILL, "the run ended before it could be interrupted"
    assert state["epoch"] <= epochs, "the interrupted run had already finished training"

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(run_dir.name).info.status == "RUNNING"
    logged_before = len(client.get_metric_history(run_dir.name, "val_loss"))

    resumed = _train(project, tmp_path, "--nproc", "2", "--resume", epochs=epochs)

    assert resumed["run_id"] == run_dir.name
    expected = load_checkpoint(runs_dir / reference["run_id"] / "best.pt")["state_dict"]
    actual = load_checkpoint(run_dir / "best.pt")["state_dict"]
    assert expected.keys() == actual.keys()
    for key in expected:  # gloo on the CPU, one thread: the same sums in the same order
        assert torch.allclose(expected[key], actual[key], rtol=0, atol=1e-7), (key, (expected[key] - actual[key]).abs().max())
    assert resumed["test_accuracy"] == reference["test_accuracy"]

    # Rank 0 alone reopened the same run: one value per resumed epoch, no second run, no rank checkpoints.
    run = client.get_run(run_dir.name)
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    history = client.get_metric_history(run_dir.name, "val_loss")
    assert sorted({m.step for m in history}) == list(range(1, epochs + 1))
    assert len(history) == logged_before + epochs - state["epoch"] + 1
    assert len(client.get_metric_history(reference["run_id"], "val_loss")) == epochs
    assert len(client.search_runs([run.info.experiment_id])) == 2
    assert {d.name for d in runs_dir.iterdir()} == {reference["run_id"], run_dir.name}
