"""Crash safety: a run killed with SIGKILL mid-epoch and resumed ends bit-identical to one never killed,
even when its newest checkpoint was truncated by the crash; a run another process still trains is not resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.context import open_run
from pipelines.data.ingest import ingest, version
from pipelines.errors import FluxoError
from pipelines.train.checkpoint import load_checkpoint, load_latest_state
from pipelines.train.lock import training_lock
from pipelines.train.resume import resume_training
from tests.conftest import SMOKE
from tests.waiting import wait_for

pytestmark = pytest.mark.e2e


def _fluxo(project: Path, tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "FLUXO_DATA__DVC_REMOTE": str(tmp_path / "dvc-remote"),
        # One thread, so both runs sum in the same order and the weights can be compared bit for bit.
        "OMP_NUM_THREADS": "1",
        "MLFLOW_LOGGING_LEVEL": "WARNING",
    }
    recipe = ["--config", str(SMOKE), "--set", "train.epochs=6", "--set", "train.checkpoint_every=4",
              "--set", "train.batch_size=64", "--set", "train.patience=10", "--set", "model.params.dropout=0.3",
              "--set", "augment.image.rotation=10"]
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "train", "--root", str(project), *recipe, *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _still_running(process: subprocess.Popen) -> None:
    """For a wait's condition: fail at once when the run ended before the state it waits for."""
    if process.poll() is not None:
        raise AssertionError(f"the run ended (exit {process.returncode}) before it could be interrupted:\n"
                             f"{process.stdout.read()[-3000:]}")


def _kill_mid_run(process: subprocess.Popen) -> None:
    """SIGKILL a training run that is still training, as a machine losing power would.

    Stopped first (SIGSTOP) and checked: had it finished in the moment since its state was seen, the kill
    would test nothing. A stopped process cannot finish; SIGKILL ends it where it stands."""
    process.send_signal(signal.SIGSTOP)
    try:
        assert process.poll() is None, "the run ended before it could be interrupted"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def _run_dirs(project: Path) -> set[Path]:
    return {d for d in (project / ".fluxo" / "checkpoints").glob("*") if d.is_dir()}


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(project: Path, settings_for, tmp_path: Path) -> None:
    settings = settings_for()
    ingest(project, settings.data)
    version(project, settings.data)

    reference = _fluxo(project, tmp_path)
    output, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, output
    (reference_dir,) = _run_dirs(project)

    crashing = _fluxo(project, tmp_path)

    def second_save() -> Path | None:
        """The run's state folder once it holds two saves: the second, at step 8, is mid-epoch 1 (17 steps an epoch)."""
        _still_running(crashing)
        new = _run_dirs(project) - {reference_dir}
        state_dir = next(iter(new)) / "state" if new else None
        return state_dir if state_dir is not None and len(list(state_dir.glob("state-*.pt"))) >= 2 else None

    state_dir = wait_for(second_save, "two training-state saves", timeout=240, interval=0.01)
    _kill_mid_run(crashing)
    run_id = state_dir.parent.name
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).info.status == "RUNNING"

    newest = sorted(state_dir.glob("state-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])  # the crash tore the last write
    state, path = load_latest_state(state_dir)
    assert path != newest and state["step_in_epoch"] >= 0

    resumed = _fluxo(project, tmp_path, "--resume")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert "resuming" in output

    expected = load_checkpoint(reference_dir / "best.pt")["state_dict"]
    actual = load_checkpoint(state_dir.parent / "best.pt")["state_dict"]
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected), "resumed weights differ"

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted({m.step for m in client.get_metric_history(run_id, "val_loss")}) == [1, 2, 3, 4, 5, 6]
    reference_run = client.get_run(reference_dir.name)
    assert run.data.metrics["test_accuracy"] == reference_run.data.metrics["test_accuracy"]


# Holds a run's lock the way a live trainer does, until it is killed.
HOLD = """
import sys, time
from pathlib import Path
from pipelines.train.lock import training_lock
with training_lock(Path(sys.argv[1]), sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_training_lock_has_one_holder_at_a_time(tmp_path: Path) -> None:
    with training_lock(tmp_path / "run-a", "run-a") as path:
        with pytest.raises(FluxoError, match="run run-a is still being trained") as refused:
            with training_lock(tmp_path / "run-a", "run-a"):
                pass
        assert str(path) in str(refused.value) and f"process {os.getpid()}" in str(refused.value)
        with training_lock(tmp_path / "run-b", "run-b"):  # other runs are not affected
            pass
    with training_lock(tmp_path / "run-a", "run-a"):  # released on exit
        pass


@pytest.mark.slow  # 15 s: a second training process
def test_resume_is_refused_while_another_process_holds_the_run(project: Path, settings_for, tmp_path: Path) -> None:
    settings = settings_for()
    ingest(project, settings.data)
    data_version = version(project, settings.data)
    crashing = _fluxo(project, tmp_path, "--set", "train.epochs=2")

    def first_save() -> list[Path]:
        _still_running(crashing)
        return list(_states(project))

    run_dir = wait_for(first_save, "a training-state save", timeout=240, interval=0.01)[0].parents[1]
    _kill_mid_run(crashing)

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), run_dir.name], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FluxoError, match=f"run {run_dir.name} is still being trained") as refused:
            resume_training(open_run(project, settings), data_version)
        message = str(refused.value)
        assert str(run_dir / "train.lock") in message and f"process {holder.pid}" in message and "wait" in message
    finally:
        holder.send_signal(signal.SIGKILL)  # a dead holder frees the lock: no stale lock to delete
        holder.wait(timeout=30)

    resumed = _fluxo(project, tmp_path, "--resume")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert f"resuming run {run_dir.name}" in output
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_dir.name).info.status == "FINISHED"


def _states(project: Path):
    return (project / ".fluxo" / "checkpoints").glob("*/state/state-*.pt")
