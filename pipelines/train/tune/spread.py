"""A study's trials at once on a Ray cluster (``cluster.address``): the driver asks Optuna for each trial and
samples its parameters (the sampler sees every finished trial, as in one process), a worker trains it.

The study lives in a journal file under the project (:func:`journal_path`), so a trial on a worker
reports each epoch into it and asks the pruner there, exactly as in one process. Each trial is still
a nested MLflow run of the study's run. A trial whose worker dies is run again by Ray
(pipelines/cluster.py); one still lost is told to Optuna as failed, its MLflow run marked FAILED, and
named in the log: never dropped in silence. A user's mistake raised in a trial stops the study, as
``study.optimize`` does in one process.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

from pipelines.cluster import carried_mistake, lost_reason, trial_task
from pipelines.settings import FluxoSettings
from pipelines.settings.tune import TuneSettings
from pipelines.train.tune.space import suggest

log = logging.getLogger("pipelines.train.tune")

FAILED_TAG = "fluxo.tune.failed"


def journal_path(root: Path, name: str) -> Path:
    """Where a study on a cluster is kept: a journal file under the project, which the trials on the workers read
    and report into (a path every node sees: the project's volume); a new file per study."""
    folder = Path(root) / ".fluxo" / "tune"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}-{uuid.uuid4().hex[:12]}.journal"


def journal_storage(path: Path) -> Any:
    """Optuna's storage over the journal file ``path`` (file locks: safe for processes that share it)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def _trial_on_worker(root: Path, settings: FluxoSettings, tune_settings: TuneSettings, data_version: Any,
                     study_name: str, journal: Path, pruner: Any, trial_id: int, tracking_uri: str,
                     parent_run_id: str, threads: int) -> tuple[str, float | None]:
    """One trial in a Ray worker: ("complete", value) or ("pruned", None)."""
    import mlflow
    import optuna
    import torch

    from pipelines.train.tune.trials import Objective

    torch.set_num_threads(threads)
    mlflow.set_tracking_uri(tracking_uri)
    study = optuna.load_study(study_name=study_name, storage=journal_storage(journal), pruner=pruner)
    trial = optuna.trial.Trial(study, trial_id)  # its parameters were sampled by the driver: suggest returns them
    try:
        return "complete", Objective(root, settings, tune_settings, data_version, parent_run_id)(trial)
    except optuna.TrialPruned:
        return "pruned", None


def optimize_on_cluster(study: Any, journal: Path, root: Path, settings: FluxoSettings, tune_settings: TuneSettings,
                        data_version: Any, parent_run_id: str, cluster_cpus: int) -> None:
    """``tune.trials`` trials (fewer when ``tune.timeout_s`` runs out), as many at once as the cluster's CPUs allow."""
    import mlflow
    import ray
    from optuna.trial import TrialState

    cpus = settings.cluster.cpus_per_trial
    slots = max(1, cluster_cpus // cpus)
    remote = trial_task(_trial_on_worker, cpus)
    started, asked, pending = time.perf_counter(), 0, {}
    log.info("study %s: up to %d trial(s) at once on the cluster (%d CPU(s) each)", study.study_name, slots, cpus)

    def may_ask() -> bool:
        timed_out = tune_settings.timeout_s is not None and time.perf_counter() - started > tune_settings.timeout_s
        return asked < tune_settings.trials and not timed_out

    while pending or may_ask():
        while len(pending) < slots and may_ask():
            trial = study.ask()
            suggest(trial, tune_settings.space, settings)
            task = remote.remote(root, settings, tune_settings, data_version, study.study_name, journal,
                                 study.pruner, trial._trial_id, mlflow.get_tracking_uri(), parent_run_id, cpus)
            pending[task] = trial
            asked += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        trial = pending.pop(done[0])
        try:
            state, value = ray.get(done[0])
        except ray.exceptions.RayTaskError as error:  # raised by the trial's own code: stops the study, as optimize does
            study.tell(trial, state=TrialState.FAIL)
            _cancel(pending)
            mistake = carried_mistake(error)
            if mistake is not None:
                raise mistake from None
            raise
        except ray.exceptions.RayError as error:  # the worker or its node was lost, retries spent
            _lost(study, trial, error)
            continue
        if state == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, value)


def _lost(study: Any, trial: Any, error: Exception) -> None:
    """A trial whose worker kept dying: failed in Optuna, FAILED in MLflow with the reason, named in the log."""
    import mlflow
    from optuna.trial import TrialState

    reason = lost_reason(error)
    run_id = trial.user_attrs.get("run_id")
    study.tell(trial, state=TrialState.FAIL)
    if run_id:
        client = mlflow.MlflowClient()
        client.set_tag(run_id, FAILED_TAG, reason)
        client.set_terminated(run_id, "FAILED")
    log.warning("trial %d failed on the cluster (%s)", trial.number, reason)


def _cancel(pending: dict[Any, Any]) -> None:
    import ray

    for task in pending:
        ray.cancel(task, force=True)
