"""The race's candidates trained at once on a Ray cluster (``cluster.address``): each rung's candidates, or
the presets trained to completion, run as tasks on the cluster's workers instead of one after another.

Every candidate stays a nested MLflow run of the race: the driver creates it under the search's parent
run, the worker trains inside it, reading the versioned data from the project (a path every node
sees). A worker lost mid-trial (its process or node dies) is retried by Ray (pipelines/cluster.py);
a trial still lost after that is marked FAILED in MLflow, named in the log and left out of the
ranking, never dropped in silence. A user's mistake raised by a trial is raised here, as it would be
in one process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.cluster import carried_mistake, lost_reason, trial_task
from pipelines.settings import FluxoSettings
from pipelines.train.trial import CANDIDATE, KIND_TAG, Candidate, Trainer, fit_candidate, run_name

log = logging.getLogger(__name__)

FAILED_TAG = "fluxo.auto.failed"


def _train_on_worker(root: Path, settings: FluxoSettings, data_version: Any, candidate: Candidate,
                     epochs: int | None, train_and_evaluate: Callable[..., Any], tracking_uri: str, run_id: str,
                     threads: int) -> tuple[int, float]:
    """One trial in a Ray worker: inside its MLflow run, with ``threads`` torch threads (Ray starts workers
    with ``OMP_NUM_THREADS=1``)."""
    import mlflow
    import torch

    torch.set_num_threads(threads)
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        return fit_candidate(root, settings, data_version, candidate, epochs, train_and_evaluate)


@dataclass
class ClusterTrainer(Trainer):
    """:class:`pipelines.train.trial.Trainer` with a batch of candidates trained at once, one task each."""

    def train_all(self, candidates: list[Candidate], epochs: int | None, out_of_time: Callable[[], bool]) -> None:
        """Every candidate of the batch at once (the budget is checked before the batch, not inside it)."""
        import mlflow
        import ray

        if not candidates or out_of_time():
            return
        client, parent = mlflow.MlflowClient(), mlflow.active_run()
        cpus = self.settings.cluster.cpus_per_trial
        remote = trial_task(_train_on_worker, cpus)
        pending: dict[Any, tuple[Candidate, str]] = {}
        started = time.perf_counter()
        for candidate in candidates:
            run = client.create_run(parent.info.experiment_id, run_name=run_name(candidate, epochs),
                                    tags={KIND_TAG: CANDIDATE, "mlflow.parentRunId": parent.info.run_id})
            candidate.run_ids.append(run.info.run_id)
            task = remote.remote(self.root, self.settings, self.data_version, candidate, epochs,
                                 self.train_and_evaluate, mlflow.get_tracking_uri(), run.info.run_id, cpus)
            pending[task] = (candidate, run.info.run_id)
        log.info("auto: %d candidate(s) training at once on the cluster (%d CPU(s) each)", len(pending), cpus)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            candidate, run_id = pending.pop(done[0])
            result = self._outcome(client, done[0], candidate, run_id)
            if result is not None:
                self.record(candidate, epochs, result)
        log.info("auto: the batch took %.1f s on the cluster", time.perf_counter() - started)

    def _outcome(self, client: Any, task: Any, candidate: Candidate, run_id: str) -> tuple[int, float] | None:
        """The trial's result; None (and the run marked FAILED) for one whose worker kept dying."""
        import ray

        try:
            return ray.get(task)
        except ray.exceptions.RayTaskError as error:  # raised by the trial's own code: as in one process
            client.set_terminated(run_id, "FAILED")
            mistake = carried_mistake(error)
            if mistake is not None:
                raise mistake from None
            raise
        except ray.exceptions.RayError as error:  # the worker or its node was lost, retries spent
            reason = lost_reason(error)
            client.set_tag(run_id, FAILED_TAG, reason)
            client.set_terminated(run_id, "FAILED")
            log.warning("auto: %s failed on the cluster (%s); it is left out of the ranking", candidate.label, reason)
            return None
