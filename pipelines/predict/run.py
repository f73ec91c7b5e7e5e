"""Batch prediction: an input file or folder → a Parquet file of predictions, recorded in MLflow.

The model runs exactly as the service runs it (``serving.runtime.OnnxModel`` on the CPU
provider, the service's validation and image decoding in ``sources``), so a batch answer
and a ``POST /predict`` answer for the same instance agree. Output is written chunk by
chunk to a temporary file beside the target and renamed into place at the end: a reader
never sees half a file, and a failed run leaves the previous one untouched. The columns:
pipelines/predict/answers.py. With ``cluster.address`` set, a Ray cluster's actors read and predict
(pipelines/predict/on_cluster.py) and this process writes their answers in the input's order.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


from pipelines.errors import FluxoError
from pipelines.predict.answers import answers_schema, write_answers
from pipelines.predict.chunk import Chunk, Contract, Tally, contract_for
from pipelines.predict.sources import (
    chunks,
    check_input,
    count_instances,
    hashes_while_reading,
    input_sha256,
)
from pipelines.context import RunContext
from pipelines.settings import FluxoSettings

log = logging.getLogger(__name__)

KIND_TAG = "fluxo.kind"
KIND = "batch-predict"
SHOWN_ERRORS = 10
KEPT_ERRORS = 10_000  # the sidecar's cap: enough to fix a file, bounded for a file that is all wrong

OnError = Literal["skip", "fail"]


@dataclass
class PredictResult:
    """What one batch prediction did; :meth:`summary` is what the CLI prints."""

    output: Path
    errors_path: Path
    model_name: str
    model_version: str | None
    rows: int = 0
    skipped: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    run_id: str | None = None
    input_sha256: str | None = None
    unseen_categories: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "skipped": self.skipped,
            "skipped_examples": self.errors[:SHOWN_ERRORS],
            "output": str(self.output),
            "errors_file": str(self.errors_path),
            "model": self.model_name,
            "version": self.model_version,
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(self.rows / self.seconds, 1) if self.seconds > 0 else None,
            "mlflow_run_id": self.run_id,
            **({"unseen_categories": self.unseen_categories} if self.unseen_categories else {}),
        }


def errors_path_for(output: Path) -> Path:
    """``preds.parquet`` → ``preds.errors.json``: the skipped rows and why, beside the predictions."""
    return output.with_name(f"{output.stem}.errors.json")


def _progress(chunks_in: Iterator[Chunk], total: int | None) -> Iterator[Chunk]:
    """A tqdm bar on a terminal; elsewhere (CI, logs) one INFO line per chunk."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    seen = 0
    with tqdm(total=total, unit="rows", disable=not interactive, desc="predict") as bar:
        for chunk in chunks_in:
            size = len(chunk.ids) + len(chunk.errors)
            seen += size
            bar.update(size)
            if not interactive:
                log.info("predicted %d%s instances", seen, f"/{total}" if total else "")
            yield chunk


def _load_model(model_dir: Path) -> Any:
    """The service's runtime on the CPU provider (a batch job must not take a GPU a server relies on)."""
    from serving.runtime import CPU, OnnxModel

    return OnnxModel(model_dir, threads=max(1, min(os.cpu_count() or 1, 8)), providers=[CPU])


def _refuse(input_path: Path, errors: list[tuple[str, str]]) -> FluxoError:
    row, reason = errors[0]
    return FluxoError(f"{input_path}: row {row}: {reason}; fix that row or pass --on-error skip to leave such rows out")


@dataclass
class LoopResult:
    """What the streaming loop did: rows written, bad rows kept for the report and counted, the input's hash."""

    rows: int
    kept: list[tuple[str, str]]
    skipped: int
    sha256: str
    unseen: dict[str, int] = field(default_factory=dict)


@contextmanager
def _atomic_parquet(output: Path, regression: bool) -> Iterator[Any]:
    """A Parquet writer on a temporary file beside ``output``, renamed into place only when the block ends
    without an error (removed otherwise): a reader never sees half a file, a failed run leaves the old one."""
    import pyarrow.parquet as pq

    output.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(handle)
    try:
        with pq.ParquetWriter(temporary, answers_schema(regression)) as writer:
            yield writer
        os.replace(temporary, output)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def predict_to_parquet(
    model: Any, contract: Contract, input_path: Path, output: Path, on_error: OnError = "skip",
    batch_size: int = 4096,
) -> LoopResult:
    """The streaming loop alone (no registry, no MLflow), writing ``output`` atomically."""
    import hashlib

    digest = hashlib.sha256()
    tally = Tally(KEPT_ERRORS)
    with _atomic_parquet(output, bool(getattr(model, "regression", False))) as writer:
        source = chunks(input_path, contract, batch_size, digest)
        for chunk in _progress(source, count_instances(input_path)):
            if chunk.errors and on_error == "fail":
                raise _refuse(input_path, chunk.errors)
            write_answers(model, chunk, writer, tally)
    sha256 = digest.hexdigest() if hashes_while_reading(input_path) else input_sha256(input_path)
    return LoopResult(tally.rows, tally.kept, tally.skipped, sha256, tally.unseen.counts)


def predict_on_cluster_to_parquet(
    settings: FluxoSettings, cluster_cpus: int, model: Any, model_dir: Path, contract: Contract, input_path: Path,
    output: Path, on_error: OnError = "skip", batch_size: int = 4096,
) -> LoopResult:
    """:func:`predict_to_parquet` with the reading and predicting done by the cluster's actors
    (pipelines/predict/on_cluster.py); the same file, written here in the input's order."""
    import pyarrow as pa

    from pipelines.predict.on_cluster import predicted_shares

    tally = Tally(KEPT_ERRORS)
    total = count_instances(input_path)
    with _atomic_parquet(output, bool(getattr(model, "regression", False))) as writer:
        for answer in predicted_shares(settings.cluster, cluster_cpus, model_dir, settings.data.sequence.label_column,
                                       input_path, contract, batch_size, KEPT_ERRORS):
            if answer["fatal"]:
                raise FluxoError(answer["fatal"])
            errors = [tuple(error) for error in json.loads(answer["errors"])]
            if errors and on_error == "fail":
                raise _refuse(input_path, errors)
            tally.skip(errors, json.loads(answer["unseen"]), int(answer["skipped"]))
            for batch in pa.ipc.open_stream(answer["table"]):
                writer.write_batch(batch)
            tally.rows += int(answer["rows"])
            log.info("predicted %d%s instances", tally.rows + tally.skipped, f"/{total}" if total else "")
    return LoopResult(tally.rows, tally.kept, tally.skipped, input_sha256(input_path), tally.unseen.counts)


def _write_errors(path: Path, input_path: Path, skipped: int, kept: list[tuple[str, str]]) -> list[dict[str, str]]:
    rows = [{"id": row, "reason": reason} for row, reason in kept]
    path.write_text(json.dumps({"input": str(input_path), "skipped": skipped, "listed": len(rows), "rows": rows},
                               indent=2) + "\n", encoding="utf-8")
    return rows


def _record(model: Any, result: PredictResult, input_path: Path) -> str:
    """One MLflow run tagged ``fluxo.kind=batch-predict`` (``fluxo export`` skips such runs)."""
    import mlflow

    meta = model.metadata
    with mlflow.start_run(run_name=f"predict-{input_path.name}", tags={KIND_TAG: KIND}) as run:
        mlflow.log_params({
            "model_name": result.model_name,
            "model_version": result.model_version,
            "model_run_id": meta.get("run_id"),
            "data_version": meta.get("data_version"),
            "input_path": str(input_path.resolve()),
            "input_sha256": result.input_sha256,
            "output_path": str(result.output.resolve()),
        })
        mlflow.log_metrics({"rows": result.rows, "rows_skipped": result.skipped, "seconds": result.seconds})
        mlflow.log_artifact(str(result.errors_path))
    return run.info.run_id


def predict(
    ctx: RunContext, input_path: Path, output: Path, model: str | None, name: str,
    on_error: OnError = "skip", batch_size: int = 4096, record: bool = True,
) -> PredictResult:
    """``fluxo predict``: resolve the model like ``fluxo serve``, stream the input, write, record."""
    from pipelines.registry.store import materialize_model

    if on_error not in ("skip", "fail"):
        raise FluxoError(f"--on-error {on_error!r}: expected skip or fail")
    if batch_size < 1:
        raise FluxoError(f"--batch-size {batch_size}: must be at least 1")
    input_path, output = Path(input_path), Path(output)
    check_input(input_path)  # a missing file is the user's to fix, before any store is opened or model fetched
    served = materialize_model(ctx, model, name)
    onnx_model = _load_model(served.path)
    contract = contract_for(onnx_model, ctx.settings.data.sequence.label_column)
    started = time.perf_counter()
    if ctx.settings.cluster.enabled:
        from pipelines.cluster import ray_cluster

        with ray_cluster(ctx.settings.cluster) as cluster:
            loop = predict_on_cluster_to_parquet(ctx.settings, cluster.cpus, onnx_model, served.path, contract,
                                                 input_path, output, on_error, batch_size)
    else:
        loop = predict_to_parquet(onnx_model, contract, input_path, output, on_error, batch_size)
    seconds = time.perf_counter() - started
    result = PredictResult(output=output, errors_path=errors_path_for(output), model_name=served.as_dict()["model_name"],
                           model_version=served.version, rows=loop.rows, skipped=loop.skipped, seconds=seconds,
                           input_sha256=loop.sha256, unseen_categories=loop.unseen)
    result.errors = _write_errors(result.errors_path, input_path, loop.skipped, loop.kept)
    if loop.skipped:
        log.warning("%s: skipped %d rows (first: %s); all listed in %s", input_path, loop.skipped,
                    "; ".join(f"{e['id']}: {e['reason']}" for e in result.errors[:3]), result.errors_path)
    if loop.unseen:
        log.warning("%s: category values training never saw, encoded as no category (unseen_category: ignore): %s",
                    input_path, ", ".join(f"{count} in {column!r}" for column, count in loop.unseen.items()))
    if record:
        result.run_id = _record(onnx_model, result, input_path)
    return result

