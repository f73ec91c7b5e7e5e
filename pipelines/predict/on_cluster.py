"""``fluxo predict`` on a Ray cluster: the input's shares as a Ray dataset, predicted by ONNX Runtime actors.

The input is cut into shares (pipelines/predict/shares.py) that workers read themselves, from a path
every node sees (the stack's shared volume, a mounted bucket): no single process holds the data. Each
actor loads the model once, from bytes the driver put in the object store (a worker need not see
the driver's model cache), with its ONNX Runtime thread count set explicitly: Ray starts workers with
``OMP_NUM_THREADS=1``. Ray Data keeps the shares' order, so the driver writes their answers as they
come, through the one-process writer, into the same atomically renamed Parquet file: same rows,
ids, probabilities and skipped rows as without a cluster.

A user's mistake found by a worker (a truncated file, a bad row under ``--on-error fail``) comes back
as data, not as an exception: it is never retried and prints no worker traceback. A worker that
dies is Ray Data's to replace: its share is run again on a new actor.
"""

from __future__ import annotations

import json
import logging
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import FluxoError
from pipelines.predict.answers import answers_schema, write_answers
from pipelines.predict.chunk import Contract, Tally, contract_for
from pipelines.predict.shares import Share, plan_shares
from pipelines.settings.cluster import ClusterSettings

log = logging.getLogger(__name__)


def model_files(model_dir: Path) -> dict[str, bytes]:
    """The model directory's files by relative path: what an actor on any node rebuilds it from."""
    return {file.relative_to(model_dir).as_posix(): file.read_bytes()
            for file in sorted(model_dir.rglob("*")) if file.is_file() and file.suffix != ".html"}


class SharePredictor:
    """A Ray Data actor: one ONNX Runtime session, reused for every share it is given."""

    def __init__(self, files: dict[str, bytes], label_column: str, threads: int, batch_size: int,
                 kept_errors: int) -> None:
        from serving.runtime import CPU, OnnxModel

        self._folder = tempfile.TemporaryDirectory(prefix="fluxo-model-")
        for name, data in files.items():
            target = Path(self._folder.name) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        self.model = OnnxModel(self._folder.name, threads=threads, providers=[CPU])
        self.contract: Contract = contract_for(self.model, label_column)
        self.batch_size = batch_size
        self.kept_errors = kept_errors

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        answers = [self._share(pickle.loads(blob)) for blob in batch["share"]]
        return {key: np.array([answer[key] for answer in answers], dtype=object) for key in answers[0]}

    def _share(self, share: Share) -> dict[str, Any]:
        """One share's answers as Arrow IPC bytes, with its skipped rows; a FluxoError as ``fatal``."""
        import pyarrow as pa

        sink = pa.BufferOutputStream()
        tally, fatal = Tally(self.kept_errors), ""
        try:
            with pa.ipc.new_stream(sink, answers_schema(bool(getattr(self.model, "regression", False)))) as writer:
                for chunk in share.read(self.contract, self.batch_size):
                    write_answers(self.model, chunk, writer, tally)
        except FluxoError as error:
            fatal = str(error)
        return {"table": sink.getvalue().to_pybytes(), "rows": tally.rows, "skipped": tally.skipped,
                "errors": json.dumps(tally.kept), "unseen": json.dumps(tally.unseen.counts), "fatal": fatal}


def actor_count(settings: ClusterSettings, cluster_cpus: int, shares: int) -> int:
    """``cluster.actors``, else as many as the cluster's CPUs allow at ``threads_per_actor`` each; never more
    than there are shares."""
    wanted = settings.actors or max(1, cluster_cpus // settings.threads_per_actor)
    return max(1, min(wanted, shares))


def predicted_shares(
    settings: ClusterSettings, cluster_cpus: int, model_dir: Path, label_column: str, input_path: Path,
    contract: Contract, batch_size: int, kept_errors: int,
) -> Iterator[dict[str, Any]]:
    """Each share's answer, in the input's order, as the cluster's actors finish them."""
    import ray

    shares = plan_shares(input_path, contract, settings.rows_per_task)
    actors = actor_count(settings, cluster_cpus, len(shares))
    log.info("%s: %d share(s) of up to %d instances on %d actor(s) of %d ONNX Runtime thread(s)", input_path,
             len(shares), settings.rows_per_task, actors, settings.threads_per_actor)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name in ("ray.data._internal.progress", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING + 1)  # the bar's absence and the run's end are ours to say
    dataset = ray.data.from_items([{"share": pickle.dumps(share)} for share in shares],
                                  override_num_blocks=len(shares))
    answered = dataset.map_batches(
        SharePredictor, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=settings.threads_per_actor,
        fn_constructor_kwargs={"files": model_files(model_dir), "label_column": label_column, "threads": settings.threads_per_actor,
                               "batch_size": batch_size, "kept_errors": kept_errors},
    )
    for batch in answered.iter_batches(batch_size=None, batch_format="numpy"):
        for index in range(len(batch["fatal"])):
            yield {key: batch[key][index] for key in batch}

