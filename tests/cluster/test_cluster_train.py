"""`fluxo train --workers 2` under Ray Train on a cluster started in the process: the same steps as
`--nproc 2` (torchrun on one host), and a worker killed mid-training resumes the same MLflow run from
its last checkpoint. The installed `fluxo`, a fresh process each run."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest

from tests.conftest import store_client
from tests.users import Project, one_error_line
from tests.waiting import wait_for

pytestmark = pytest.mark.slow  # Ray Train starts a controller and a worker group per run: a minute each

CLUSTER = ("--set", "cluster.address=local", "--set", "cluster.cpus=2")


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Project:
    user = Project.clone_shaped(tmp_path_factory.mktemp("cluster-train"))
    ingested = user.fluxo("data", "ingest", "--config", "configs/smoke.yaml", *_stores(user))
    assert ingested.returncode == 0, ingested.stderr[-3000:]
    return user


def _stores(user: Project) -> tuple[str, ...]:
    stores = user.root.parent
    return ("--set", f"tracking.tracking_uri=sqlite:///{stores / 'mlflow.db'}",
            "--set", f"data.dvc_remote={stores / 'dvc-remote'}")


def _train(user: Project, *args: str) -> dict:
    result = user.fluxo("train", "--config", "configs/smoke.yaml", *args, *_stores(user))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return json.loads(result.stdout[result.stdout.index("{"):])


def _losses(user: Project, run_id: str) -> dict[int, float]:
    history = store_client(user.root.parent / "mlflow.db").get_metric_history(run_id, "train_loss")
    return {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}  # a re-logged step: the last


def test_two_ray_train_workers_take_the_steps_of_two_torchrun_processes(user: Project) -> None:
    on_host = _train(user, "--nproc", "2", "--set", "train.epochs=3")
    on_cluster = _train(user, "--workers", "2", *CLUSTER, "--set", "train.epochs=3")
    assert _losses(user, on_cluster["run_id"]) == _losses(user, on_host["run_id"])
    assert on_cluster["test_accuracy"] == on_host["test_accuracy"]
    run = store_client(user.root.parent / "mlflow.db").get_run(on_cluster["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"


def _registered_states(storage: Path, earlier: set[Path] = frozenset()) -> int:
    """Checkpoints Ray Train has registered (its snapshot lists them) that hold a training state, in the runs'
    folders other than ``earlier`` (those of the module's earlier runs)."""
    count = 0
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        if snapshot.parent in earlier:
            continue
        try:
            entries = json.loads(snapshot.read_text())["checkpoint_results"]
        except (OSError, ValueError, KeyError):  # being rewritten right now: ask again
            return 0
        for entry in entries:
            if list((snapshot.parent / entry["checkpoint_dir_name"]).glob("state-*.pt")):
                count += 1
    return count


def _is_train_worker(process: psutil.Process) -> bool:
    try:
        return "RayTrainWorker" in " ".join(process.cmdline())
    except psutil.Error:  # gone meanwhile
        return False


def test_a_worker_killed_mid_training_resumes_the_same_run_from_its_last_checkpoint(user: Project) -> None:
    # Small batches make each epoch long enough (about 125 steps) that the kill lands mid-training on an idle
    # machine too: the two checkpointed epochs are a few seconds of the thirty.
    epochs = ("--set", "train.epochs=30", "--set", "train.patience=100", "--set", "train.batch_size=8")
    client = store_client(user.root.parent / "mlflow.db")
    before = {r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    storage = user.root / ".fluxo" / "ray-train"
    earlier = set(storage.glob("*"))  # the two-worker test's run, already complete: not this run's checkpoints
    process, log = user.start("train", "--config", "configs/smoke.yaml", "--workers", "2", *CLUSTER, *epochs,
                              *_stores(user))
    try:
        wait_for(lambda: _registered_states(storage, earlier) >= 2, "two epochs checkpointed", timeout=240)
        # Ray's raylet parents its workers (not the command): this test's are the only ones on the machine.
        workers = [p for p in psutil.process_iter() if _is_train_worker(p)]
        assert len(workers) == 2, f"training ended before the kill (make its epochs longer): {log.read_text()[-2000:]}"
        os.kill(workers[-1].pid, signal.SIGKILL)  # the worker's process dies, as with its node
        assert process.wait(timeout=400) == 0, log.read_text()[-4000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    output = log.read_text()
    run_id = json.loads(output[output.index("{"):output.rindex("}") + 1])["run_id"]
    runs = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
            if r.info.run_id not in before]
    assert [r.info.run_id for r in runs] == [run_id], "one MLflow run for the whole job, restarts included"
    assert runs[0].info.status == "FINISHED"
    assert sorted(_losses(user, run_id)) == list(range(1, 31)), "every epoch logged once the run resumed"
    uninterrupted = _train(user, "--nproc", "2", *epochs)
    assert _losses(user, run_id) == pytest.approx(_losses(user, uninterrupted["run_id"]), rel=1e-6)
    leftover = [p for p in psutil.process_iter() if _is_train_worker(p)]
    assert not leftover, "the command's Ray processes outlived it"


def test_workers_without_a_cluster_is_one_line_naming_the_setting(user: Project) -> None:
    line = one_error_line(user.fluxo("train", "--config", "configs/smoke.yaml", "--workers", "2", *_stores(user)))
    assert "cluster.address" in line and "--nproc" in line, line
