"""Load a model directory into an ONNX Runtime session and run it.

The model directory (see ``serving/README.md``) is the whole contract between
export and serving: ``model.onnx`` plus ``metadata.json``. Everything is checked
at load time so a bad directory fails the server start with a message naming the
file, instead of failing every request later.
"""

from __future__ import annotations

import ctypes
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from serving import ServingError
from serving.contract import (
    FIX,
    LENGTHS_NAME,
    METADATA_FILE,
    MODEL_FILE,
    VARIANTS,
    TableInput,
    read_model_dir,
    variant_file,
)

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_FIX = FIX


def takes_lengths(session: ort.InferenceSession) -> bool:
    """True for a variable-length RNN's graph: a second input, ``lengths`` (pipelines/export)."""
    return any(i.name == LENGTHS_NAME for i in session.get_inputs())


def nan_padded_lengths(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(batch with its NaN padding set to 0, valid steps of each row) for (n, C, L) sequences.

    Ragged instances reach the model padded to ``L`` with NaN (serving/schemas.py): client
    values are never NaN (validation refuses them), so NaN marks padding, and the batcher
    merges such rows like any others. A row without NaN is ``L`` steps long.
    """
    nan = np.isnan(batch)
    if not nan.any():
        return batch, np.full(len(batch), batch.shape[-1], dtype=np.int64)
    valid = ~nan.reshape(len(batch), -1, batch.shape[-1]).all(axis=1)  # (n, L): a step with any value
    lengths = batch.shape[-1] - np.argmax(valid[:, ::-1], axis=1)
    return np.where(nan, np.float32(0), batch), lengths.astype(np.int64)


def nan_padded(batch: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(n, C, L) sequences with every step past each row's length set to NaN: the inverse of
    :func:`nan_padded_lengths`, for callers that know the lengths (v2's lengths input, a CSV's rows)."""
    past = np.arange(batch.shape[-1]) >= np.asarray(lengths)[:, None, None]
    return np.where(past, np.float32(np.nan), batch)


def graph_feeds(session: ort.InferenceSession, input_name: str, batch: np.ndarray,
                lengths: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """What one run is fed: the batch, and for a graph that takes lengths, each row's valid steps
    (``lengths`` when given, else read from NaN padding; full length without any)."""
    if not takes_lengths(session):
        return {input_name: batch}
    if lengths is None:
        batch, lengths = nan_padded_lengths(batch)
    return {input_name: batch, LENGTHS_NAME: np.asarray(lengths, dtype=np.int64)}


def load_metadata(model_dir: Path | str) -> dict[str, Any]:
    """The model directory's metadata as the service reads it (serving.contract), checked at load time."""
    return read_model_dir(model_dir).as_dict()


def cuda_device_present() -> bool:
    """True when the CUDA driver reports at least one device.

    onnxruntime-gpu lists CUDAExecutionProvider whenever its libraries load, GPU
    or not, and logs an ERROR when asked for CUDA without a device; asking the
    driver directly avoids that false alarm on CPU machines.
    """
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            driver = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return False
    try:
        if driver.cuInit(0) != 0:
            return False
        count = ctypes.c_int(0)
        return driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except (AttributeError, OSError):
        return False


def choose_providers(available: Sequence[str] | None = None, has_cuda_device: bool | None = None) -> list[str]:
    """CUDA then CPU when both the CUDA provider and a device exist, else CPU alone.

    TensorRT is never picked: its engine build takes minutes at first load.
    The arguments exist so tests can pose as other machines.
    """
    available = ort.get_available_providers() if available is None else available
    if CUDA in available and (cuda_device_present() if has_cuda_device is None else has_cuda_device):
        return [CUDA, CPU]
    return [CPU]


def providers_for(preference: str = "auto") -> list[str]:
    """Providers for ``FLUXO_PROVIDER``: ``auto`` as :func:`choose_providers`, ``cpu``, or ``cuda``.

    ``cuda`` refuses to start on a machine that cannot run it, rather than
    serving on the CPU while the operator believes a GPU is in use.
    """
    if preference == "cpu":
        return [CPU]
    if preference == "cuda":
        if CUDA not in ort.get_available_providers():
            raise ServingError(
                f"FLUXO_PROVIDER=cuda but this onnxruntime ({ort.__version__}) has no {CUDA}; "
                "install onnxruntime-gpu or set FLUXO_PROVIDER=auto"
            )
        if not cuda_device_present():
            raise ServingError("FLUXO_PROVIDER=cuda but the CUDA driver reports no GPU; set FLUXO_PROVIDER=auto")
        return [CUDA, CPU]
    return choose_providers()


def session_options(threads: int = 1) -> ort.SessionOptions:
    """Options for a small shared box: few threads, no spinning, full graph optimisation.

    Adaptive batching already turns concurrency into larger batches, so more
    intra-op threads mostly compete with the HTTP workers for the same cores.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads burn a core while idle; on 2 cores that steals from the server.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax: subtracting the max keeps exp() from overflowing."""
    shifted = logits - np.max(logits, axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / np.sum(exp, axis=axis, keepdims=True)


def choose_variant(meta: Mapping[str, Any], requested: str, provider: str, model_dir: Path) -> str:
    """The precision to load: ``requested``, or for ``auto`` the fastest variant kept for ``provider``.

    A variant is usable when export's gate kept it (metadata ``variants``), its file is in
    the directory, and it was measured on the provider about to run it: an int8 graph that
    was fast on the CPU says nothing about CUDA. Asking for an unusable one is a
    ServingError that says why it is not there; ``auto`` falls back to fp32.
    """
    if requested not in ("auto", *VARIANTS):
        raise ServingError(f"FLUXO_VARIANT={requested}: expected auto or one of {', '.join(VARIANTS)}")
    decisions: Mapping[str, Any] = meta.get("variants") or {}

    def usable(name: str) -> bool:
        decision = decisions.get(name) or {}
        return (bool(decision.get("kept")) and decision.get("provider", CPU) == provider
                and (model_dir / variant_file(name)).is_file())

    if requested in ("fp32", "auto"):
        kept = [name for name in VARIANTS[1:] if usable(name)] if requested == "auto" else []
        return max(kept, key=lambda name: float(decisions[name].get("speedup") or 0)) if kept else "fp32"
    if usable(requested):
        return requested
    decision = decisions.get(requested)
    if decision is None:
        why = "export did not build one (export.variants off, or a model exported before variants existed)"
    elif decision.get("kept") and decision.get("provider", CPU) != provider:
        why = f"it was measured and kept on {decision.get('provider')}, and this server runs {provider}"
    elif decision.get("kept"):
        why = f"{variant_file(requested)} is missing from the directory"
    else:
        why = f"export's gate refused it: {decision.get('reason')}"
    usable_ones = ["fp32", *(name for name in VARIANTS[1:] if usable(name))]
    raise ServingError(f"FLUXO_VARIANT={requested}: {model_dir} has no usable {requested} variant, {why}; "
                       f"usable here: {', '.join(usable_ones)}; set FLUXO_VARIANT=auto or fp32")


def _batch_fix(size: int) -> str:
    """The fix for a graph that cannot run ``size`` rows: a dynamic batch axis (a fixed one is the usual cause)."""
    if size == 1:
        return _FIX
    return ("re-export the model with a dynamic batch axis (torch.onnx.export(..., dynamic_axes={'input': {0: "
            "'batch'}}), as `fluxo export` does)")


class OnnxModel:
    """A model directory loaded into an ONNX Runtime session, checked against its metadata."""

    def __init__(
        self,
        model_dir: Path | str,
        *,
        threads: int = 1,
        providers: Sequence[str] | None = None,
        strict: bool = False,
        variant: str = "fp32",
        max_batch_size: int = 1,
    ) -> None:
        """``max_batch_size``: the most rows one run may hold (the server's batcher merges requests up
        to FLUXO_MAX_BATCH_SIZE); the graph is checked at 1 row and at that many before anyone is served."""
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise ServingError(f"model directory {self.model_dir}: no such directory; {_FIX}")
        self.metadata: dict[str, Any] = load_metadata(self.model_dir)
        self.input_shape: tuple[int, ...] = tuple(self.metadata["input_shape"])
        self.labels: list[str] = list(self.metadata["labels"])
        self.input_name: str = self.metadata["input_name"]
        self.output_name: str = self.metadata["output_name"]
        self.kind: str | None = self.metadata.get("kind")
        self.task: str = str(self.metadata.get("task") or "multiclass")
        # A regression model answers one value per instance (the graph's output, in the target's units), not a
        # softmax over labels: :meth:`predict_outputs` is what the batcher runs and every route reads.
        self.regression: bool = self.task == "regression"
        if self.regression and len(self.labels) != 1:
            raise ServingError(f"{self.model_dir / METADATA_FILE}: task is 'regression' but labels lists "
                               f"{len(self.labels)} names; a regression model has one output, labels [the target's "
                               f"name]; {_FIX}")
        # A table model's columns, prepared once for POST /predict's rows (serving/table_rows.py); None otherwise.
        self.table: TableInput | None = None
        self.table_rows: Any = None
        if self.kind == "table":
            from serving.table_rows import TableRows

            if not self.metadata.get("table"):
                raise ServingError(f"{self.model_dir / METADATA_FILE}: kind is 'table' but there is no 'table' field "
                                   f"(its columns); {_FIX}")
            self.table = TableInput.model_validate(self.metadata["table"])
            if len(self.table.columns) != int(np.prod(self.input_shape)) or len(self.input_shape) != 1:
                raise ServingError(f"{self.model_dir / METADATA_FILE}: 'table' lists {len(self.table.columns)} columns, "
                                   f"input_shape is {list(self.input_shape)}; {_FIX}")
            self.table_rows = TableRows(self.table)
        requested = list(providers) if providers else choose_providers()
        self.variant: str = choose_variant(self.metadata, variant, requested[0], self.model_dir)
        self.session = self._open_session(threads, requested)
        self.provider: str = self.session.get_providers()[0]
        if self.provider != requested[0]:
            # onnxruntime falls back silently when a provider fails to initialise; say so loudly.
            if strict:
                raise ServingError(
                    f"{self.model_dir / MODEL_FILE}: asked ONNX Runtime for {requested[0]} but it runs on "
                    f"{self.provider}; check the CUDA/cuDNN libraries or set FLUXO_PROVIDER=auto"
                )
            logger.warning(
                "asked ONNX Runtime for %s but it fell back to %s for %s; /metadata reports %s",
                requested[0], self.provider, self.model_dir, self.provider,
            )
        self.batch_sizes: tuple[int, ...] = tuple(sorted({1, max_batch_size}))
        self._check_graph()
        self.takes_lengths = takes_lengths(self.session)
        self._check_runs()
        logger.debug("loaded %s on %s", self.model_dir, self.provider)

    def _check_runs(self) -> None:
        """One throwaway run of zeros per batch size the server may ask for: a graph that cannot run
        fails here, at start, not on every request. The largest matters as much as one row: a graph
        whose batch axis was fixed at export (a Reshape to 1, say) runs one row and fails every
        merged batch. The first run also pays lazy allocations (and CUDA set-up) before any request."""
        for size in self.batch_sizes:
            try:
                self.predict_logits(np.zeros((size, *self.input_shape), dtype=np.float32))
            except Exception as error:
                raise ServingError(
                    f"{self.model_dir / MODEL_FILE}: fails on a zero batch of shape {(size, *self.input_shape)} "
                    f"({error}); {_batch_fix(size)}"
                ) from error

    def warmup(self, batch_sizes: Sequence[int], runs: int) -> float:
        """Run each batch size ``runs`` times on made-up rows, through :meth:`predict_outputs`; seconds spent.

        The check run above only covers one row. ONNX Runtime sizes its memory arena and
        its kernels' buffers on the first runs of each batch shape, so without this the
        first full batch after a start or a hot reload is the slow one (bench/warmup.py
        has the numbers). The server calls this before it reports ready, or before it
        switches a reload over, so no client pays it. A lengths-taking graph also gets
        rows padded short, to warm the path that reads ragged instances.
        """
        started = time.perf_counter()
        rng = np.random.default_rng(0)
        for size in batch_sizes:
            batch = rng.standard_normal((size, *self.input_shape)).astype(np.float32)
            if self.takes_lengths and len(self.input_shape) == 2:
                batch[::2, :, max(1, self.input_shape[-1] // 2):] = np.nan
            try:
                for _ in range(runs):
                    self.predict_outputs(batch)
            except Exception as error:  # a ServingError like every load failure: callers keep what they serve
                raise ServingError(f"{self.model_dir / MODEL_FILE}: warmup fails on a batch of {size} rows "
                                   f"({error}); {_batch_fix(size)}") from error
        return time.perf_counter() - started

    def describe(self) -> str:
        """One line for logs: which model, from where, on which provider."""
        return (
            f"{self.metadata.get('model_name', 'model')} version {self.metadata.get('model_version')} "
            f"({self.variant}) from {self.model_dir} on {self.provider} (ONNX Runtime {ort.__version__}, "
            f"{self.session.get_session_options().intra_op_num_threads} intra-op threads)"
        )

    def _open_session(self, threads: int, providers: list[str]) -> ort.InferenceSession:
        path = self.model_dir / variant_file(self.variant)
        if not path.is_file():
            raise ServingError(
                f"{path}: no such file; a model directory needs {MODEL_FILE} and {METADATA_FILE}; {_FIX}"
            )
        try:
            return ort.InferenceSession(str(path), sess_options=session_options(threads), providers=providers)
        except Exception as error:  # onnxruntime raises several pybind types for bad files
            raise ServingError(f"{path}: ONNX Runtime cannot load it ({error}); {_FIX}") from error

    def _check_graph(self) -> None:
        """The graph's input/output names and fixed dims must agree with metadata.json."""
        where = f"{self.model_dir / MODEL_FILE} vs {METADATA_FILE}"
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if self.input_name not in inputs:
            raise ServingError(
                f"{where}: graph inputs are {sorted(inputs)}, metadata names {self.input_name!r}; {_FIX}"
            )
        if self.output_name not in outputs:
            raise ServingError(
                f"{where}: graph outputs are {sorted(outputs)}, metadata names {self.output_name!r}; {_FIX}"
            )
        graph_shape = list(inputs[self.input_name].shape)
        fixed = graph_shape[0] if graph_shape and isinstance(graph_shape[0], int) else None
        if fixed is not None and any(size != fixed for size in self.batch_sizes):
            raise ServingError(
                f"{where}: graph input {self.input_name!r} has shape {graph_shape}: its batch axis is fixed at "
                f"{fixed}, and this server runs batches of {' and '.join(map(str, self.batch_sizes))} rows "
                f"(FLUXO_MAX_BATCH_SIZE merges concurrent requests); {_batch_fix(max(self.batch_sizes))}"
            )
        dims = graph_shape[1:]
        if len(dims) != len(self.input_shape) or any(
            isinstance(g, int) and g != m for g, m in zip(dims, self.input_shape)
        ):
            raise ServingError(
                f"{where}: graph input {self.input_name!r} has shape {graph_shape} (batch first), "
                f"metadata input_shape is {list(self.input_shape)}; {_FIX}"
            )
        out_shape = list(outputs[self.output_name].shape)
        if out_shape and isinstance(out_shape[-1], int) and out_shape[-1] != len(self.labels):
            raise ServingError(
                f"{where}: graph output {self.output_name!r} has {out_shape[-1]} classes, "
                f"metadata lists {len(self.labels)} labels; {_FIX}"
            )

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits of shape (batch, n_labels) for a float32 batch of shape (batch, *input_shape)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.shape[1:] != self.input_shape:
            raise ValueError(f"batch has shape {batch.shape}, expected (n, {', '.join(map(str, self.input_shape))})")
        feeds = {self.input_name: batch}
        if self.takes_lengths:  # decided once at load: no graph inspection per batch
            feeds[self.input_name], feeds[LENGTHS_NAME] = nan_padded_lengths(batch)
        (logits,) = self.session.run([self.output_name], feeds)
        return np.asarray(logits, dtype=np.float32)

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities: the softmax of :meth:`predict_logits`."""
        return softmax(self.predict_logits(batch))

    def predict_outputs(self, batch: np.ndarray) -> np.ndarray:
        """What the service answers from: class probabilities (n, n_labels), or for a regression model
        the graph's values (n, 1) in the target's units."""
        if not self.regression:
            return self.predict_proba(batch)
        values = self.predict_logits(batch)
        return values.reshape(len(values), 1)

    def info(self) -> dict[str, Any]:
        """What ``GET /metadata`` reports: identity, data version, contract, metrics, provider."""
        return public_metadata(self.metadata, self.provider, self.variant)


def public_metadata(meta: Mapping[str, Any], provider: str, variant: str = "fp32") -> dict[str, Any]:
    """The metadata fields a client may rely on, plus the provider and the variant actually running.

    ``kind`` is the input kind (image, sequence, table; null in older directories). A table model
    adds ``table``: its columns in input order (name, type, a category's vocabulary, the training
    statistics: missing count, median, center, scale) and its policies (``missing``,
    ``unseen_category``, ``scaling``); ``columns`` is the part of it two models must share to
    stand in for each other (name, type, categories: serving.contract.CONTRACT_FIELDS). Both are
    null for other kinds. ``task`` is multiclass, binary (answers: a label and its probabilities) or
    regression (answers: one value, in the units of the target ``labels[0]``).
    """
    metrics = meta.get("test_metrics") or {}
    table = meta.get("table") if meta.get("kind") == "table" else None
    columns = None if not table else [
        {"name": c.get("name"), "type": c.get("type"), "categories": c.get("categories")} for c in table["columns"]]
    return {
        "model_name": meta.get("model_name"),
        "model_version": None if meta.get("model_version") is None else str(meta["model_version"]),
        "architecture": meta.get("architecture"),
        "task": str(meta.get("task") or "multiclass"),
        "run_id": meta.get("run_id"),
        "dataset": meta.get("dataset"),
        "data_version": meta.get("data_version"),
        "input_shape": list(meta["input_shape"]),
        "input_dtype": meta.get("input_dtype", "float32"),
        "labels": list(meta["labels"]),
        "test_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
        "onnx_opset": meta.get("onnx_opset"),
        "takes_lengths": bool(meta.get("takes_lengths")),
        "kind": meta.get("kind"),
        "table": table,
        "columns": columns,
        "provider": provider,
        "variant": variant,
        "variants": {name: {k: v for k, v in decision.items() if k != "file"}
                     for name, decision in (meta.get("variants") or {}).items()},
    }
