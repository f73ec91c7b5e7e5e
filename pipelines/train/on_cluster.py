"""``fluxo train --workers N`` on a Ray cluster: the same training step as ``--nproc N``, under Ray Train.

Ray Train's ``TorchTrainer`` starts N workers (one CPU each, or one GPU each where there are GPUs),
wherever the cluster has room, sets up the process group (gloo on the CPU, NCCL on GPUs) and the
``RANK``/``WORLD_SIZE`` variables ``torchrun`` would, and each worker runs :func:`pipelines.train.run.train`
unchanged: rank 0 opens the one MLflow run and writes the checkpoints, every rank draws the same batch
order and trains on its slice, so N workers on N nodes take the same steps as N processes on one host.

Crash safety across nodes: at each epoch's end rank 0 hands Ray Train a checkpoint holding the newest
resumable state (pipelines/train/checkpoint.py) and the MLflow run's id, which Ray Train keeps in
``cluster.storage`` (a path every node sees, or a bucket). When a worker or its node dies, Ray Train
restarts the whole group (``cluster.max_failures`` times); each new worker puts that state back where
``fluxo train --resume`` finds it and resumes the same MLflow run, so the job ends with one run.

A user's mistake found on a worker (a setting, the data) is not a failure to retry: the workers
report it and stop, and the command says it in one line.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipelines.context import RunContext
from pipelines.data.versioning import DataVersion
from pipelines.errors import FluxoError
from pipelines.train.callbacks import Callback
from pipelines.train.checkpoint import STATE_PATTERN
from pipelines.train.fit_state import FitState
from pipelines.train.result import TrainResult

log = logging.getLogger(__name__)

RUN_FILE = "run.json"  # in a Ray Train checkpoint: the MLflow run the checkpoint's state belongs to
STATES_KEPT = 2  # Ray Train checkpoints kept per training: the newest (a restart resumes it) and the one before


class ReportToRayTrain(Callback):
    """Every rank reports each epoch to Ray Train (it counts reports per rank); rank 0's report carries a
    checkpoint: the MLflow run's id and the newest state file, for a restarted group to resume from."""

    def __init__(self, root: Path, checkpoint_dir: Path) -> None:
        self.runs = Path(root) / checkpoint_dir

    def on_fit_start(self, state: FitState) -> None:
        self._report(state, {"epoch": state.epoch - 1})  # the run's id, before any epoch: a restart joins this run

    def on_epoch_end(self, state: FitState) -> None:
        self._report(state, {"epoch": state.epoch, **{k: float(v) for k, v in state.record.items()}})

    def _report(self, state: FitState, metrics: dict[str, Any]) -> None:
        import mlflow
        import ray.train

        if not state.main:
            ray.train.report(metrics)
            return
        run_id = mlflow.active_run().info.run_id
        with tempfile.TemporaryDirectory(prefix="fluxo-checkpoint-") as folder:
            (Path(folder) / RUN_FILE).write_text(json.dumps({"run_id": run_id}), encoding="utf-8")
            newest = sorted((self.runs / run_id / "state").glob(STATE_PATTERN))[-1:]
            for path in newest:
                shutil.copy2(path, Path(folder) / path.name)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _restore(checkpoint: Any, runs: Path) -> tuple[str, bool]:
    """A Ray Train checkpoint put back under ``runs``: (its MLflow run id, whether it holds a training state)."""
    with checkpoint.as_directory() as folder:
        run_id = json.loads((Path(folder) / RUN_FILE).read_text(encoding="utf-8"))["run_id"]
        states = sorted(Path(folder).glob(STATE_PATTERN))
        target = runs / run_id / "state"
        target.mkdir(parents=True, exist_ok=True)
        for path in states:
            if not (target / path.name).exists():  # a node that wrote it itself keeps its own copy
                shutil.copy2(path, target / path.name)
    return run_id, bool(states)


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: train (or, after a restart, resume) as a rank of ``fluxo train --nproc``."""
    import ray.train

    from pipelines.context import open_run
    from pipelines.settings import FluxoSettings
    from pipelines.train.resume import resume_training
    from pipelines.train.run import train

    settings = FluxoSettings.model_validate(config["settings"])
    ctx = open_run(Path(config["root"]), settings)
    data_version: DataVersion = config["data_version"]
    report = ReportToRayTrain(ctx.root, settings.train.checkpoint_dir)
    checkpoint = ray.train.get_checkpoint()
    rank = ray.train.get_context().get_world_rank()
    run_id, has_state = config["run_id"], False
    if checkpoint is not None:
        run_id, has_state = _restore(checkpoint, ctx.root / settings.train.checkpoint_dir)
    try:
        if has_state:
            log.warning("rank %d: the group restarted; resuming MLflow run %s from its last state", rank, run_id)
            result = resume_training(ctx, data_version, run_id, callbacks=[report])
        else:  # the first start, or a restart before any epoch ended: from the beginning, in the same run
            result = train(ctx, data_version, callbacks=[report], run_id=run_id)
    except FluxoError as error:
        with tempfile.TemporaryDirectory(prefix="fluxo-error-") as folder:  # kept by Ray Train only with a checkpoint
            ray.train.report({"fluxo_error": str(error)},
                             checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None)
        return
    if rank != 0:
        ray.train.report({})
        return
    # Ray Train keeps the metrics of reports that carry a checkpoint: the result goes with one.
    with tempfile.TemporaryDirectory(prefix="fluxo-result-") as folder:
        (Path(folder) / RUN_FILE).write_text(json.dumps({"run_id": result.run_id}), encoding="utf-8")
        ray.train.report({"run_id": result.run_id, "best_epoch": result.best_epoch, "seconds": result.seconds,
                          "registered_model": result.registered_model, "checkpoint": str(result.checkpoint),
                          **{k if k.startswith("test_") else f"test_{k}": v for k, v in result.test_metrics.items()}},
                         checkpoint=ray.train.Checkpoint.from_directory(folder))


def _create_run(ctx: RunContext) -> str:
    """The one MLflow run of the training, made here so that every attempt of the worker group writes to it."""
    from pipelines.data.store import read_dataset
    from pipelines.train.preflight import resolve_model
    from pipelines.train.run import run_name

    dataset = read_dataset(ctx.root / ctx.settings.data.data_dir)
    settings, _ = resolve_model(ctx.settings, dataset)
    return ctx.client().create_run(ctx.experiment_id, run_name=run_name(dataset, settings)).info.run_id


def train_on_cluster(ctx: RunContext, data_version: DataVersion, workers: int, cluster_cpus: int) -> TrainResult:
    """Train with ``workers`` Ray Train workers; the result rank 0 reported (the MLflow run, the test metrics)."""
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    settings = ctx.settings
    gpu = settings.train.device != "cpu" and torch.cuda.is_available()
    if not gpu and workers * settings.cluster.cpus_per_trial > cluster_cpus:
        raise FluxoError(f"--workers {workers}: the cluster has {cluster_cpus} CPU(s) and each worker takes "
                         f"cluster.cpus_per_trial={settings.cluster.cpus_per_trial}; use fewer workers or add nodes")
    storage = settings.cluster.storage or str(ctx.root / ".fluxo" / "ray-train")
    run_id = _create_run(ctx)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"root": str(ctx.root), "settings": settings.model_dump(mode="json"),
                           "data_version": data_version, "run_id": run_id},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu,
                                     resources_per_worker=None if gpu else {"CPU": settings.cluster.cpus_per_trial}),
        # Named by the MLflow run: Ray Train resumes a name it finds in the storage, so a name shared by two
        # trainings (the data version's, as it was) made the second restore the first's last state. Only the
        # newest states are kept: a restart needs the last one.
        run_config=RunConfig(name=f"fluxo-train-{run_id}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=settings.cluster.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=STATES_KEPT)),
    )
    log.info("training on %d Ray Train worker(s) (%s), checkpoints in %s", workers, "GPU" if gpu else "CPU", storage)
    try:
        result = trainer.fit()
    except Exception as error:  # ray.train.TrainingFailedError: a worker kept failing past max_failures
        ctx.client().set_terminated(run_id, "FAILED")
        raise RuntimeError(f"training on the cluster failed after cluster.max_failures="
                           f"{settings.cluster.max_failures} restarts: {error}") from error
    metrics = dict(result.metrics or {})
    if "fluxo_error" in metrics:
        ctx.client().delete_run(run_id)  # a mistake before training: no run to keep, as in one process
        raise FluxoError(metrics["fluxo_error"])
    tests = {k: float(v) for k, v in metrics.items() if k.startswith("test_")}
    return TrainResult(str(metrics["run_id"]), Path(str(metrics["checkpoint"])), tests, int(metrics["best_epoch"]), float(metrics["seconds"]),
                       str(metrics.get("registered_model") or ""))
