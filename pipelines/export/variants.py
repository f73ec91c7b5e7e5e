"""Lower-precision variants of an exported graph (int8, fp16), each kept only when it earns its place.

Export calls :func:`build_variants` on the staged ``model.onnx``. Each variant is built, checked
the way the float graph is (parity against it, test accuracy as served), timed against it at
batch 1 and 32 in the same process on the provider that will serve it, and kept only when it
loses at most ``export.max_accuracy_drop`` test-accuracy points and runs at least
``export.min_speedup`` times faster. Only a kept variant's file is written into the model
directory (``model.<variant>.onnx``, serving/contract.py); every decision, kept or not, goes into
``metadata.json`` (``variants``), the run (MLflow) and the report, so a server asked for a variant
that is not there can say why, and a person can see what it would have cost.

* int8: ONNX Runtime static quantization in QDQ form. Activation ranges are calibrated on a
  bounded, seeded sample of training rows (validation rows only when training has too few),
  never the test split, which scores the result: calibrating on it would let the variant see
  the data it is judged on. Weights are quantized per tensor; per channel only when per tensor
  loses too much accuracy (it is a little slower on the CPU, ORT's own guidance). Recurrent
  layers (GRU, LSTM) have no static int8 kernel in ONNX Runtime: such a model is refused with
  that reason before anything is built, and serves fp32.
* fp16: a float16 graph whose input and output stay float32 (the contract), built only where a
  CUDA device will serve: a CPU has few float16 kernels, so there it only adds casts.

Why batch 32 decides the speedup: the service's batcher merges concurrent requests into runs of
up to 32 rows (``FLUXO_MAX_BATCH_SIZE``), and it is under that load that model time limits
throughput. A lone request's model run takes tens of microseconds beside about a millisecond of
HTTP and JSON, so a variant's effect at batch 1 is invisible to a client; it is measured and
recorded (``speedup_batch1``) but does not decide.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.data.store import Dataset
from serving.scoring import session_logits
from pipelines.settings import ExportSettings
from serving.contract import INPUT_NAME, VARIANTS, variant_file
from serving.runtime import CPU, CUDA, choose_providers, graph_feeds, session_options

log = logging.getLogger(__name__)

CALIBRATION_SPLITS = ("train", "val")
"""Where int8 calibration rows may come from; the test split scores the variant, so never from it."""
CALIBRATION_ROWS = 256
"""Enough rows for stable min/max ranges on these models, few enough to calibrate in well under a second."""
LATENCY_BATCHES = (1, 32)
SPEEDUP_BATCH = 32
RECURRENT_OPS = frozenset({"GRU", "LSTM", "RNN"})
TIMING_BUDGET_S = 0.4
"""Seconds of alternating fp32/variant runs per batch size: a couple of seconds per model in all."""
NO_CUDA = "no CUDA provider here: fp16 is built only where a CUDA device serves it (a CPU has few float16 kernels)"


@dataclass(frozen=True)
class VariantDecision:
    """What export's gate decided about one variant, with the numbers it decided on.

    The keys of :meth:`as_dict` are what ``metadata.json``'s ``variants`` holds and the
    service reads (serving/runtime.py ``choose_variant``: kept, reason, speedup, provider).
    """

    kept: bool
    reason: str
    provider: str
    test_accuracy: float | None = None
    fp32_test_accuracy: float | None = None
    accuracy_drop: float | None = None  # points: (fp32 - variant) * 100
    latency_ms_batch1: float | None = None
    latency_ms_batch32: float | None = None
    fp32_latency_ms_batch1: float | None = None
    fp32_latency_ms_batch32: float | None = None
    speedup: float | None = None  # at SPEEDUP_BATCH, what the gate reads
    speedup_batch1: float | None = None
    max_abs_diff: float | None = None  # against the fp32 graph, on the test split
    argmax_agreement: float | None = None
    size_bytes: int | None = None
    fp32_size_bytes: int | None = None
    per_channel: bool | None = None
    calibration: dict[str, Any] | None = None  # int8: which splits, how many rows
    file: str | None = None  # set when kept: the file in the model directory

    def as_dict(self) -> dict[str, Any]:
        """The decision as metadata.json stores it (unmeasured numbers left out)."""
        return {key: value for key, value in asdict(self).items() if value is not None}


# --- calibration -----------------------------------------------------------------------------


class CalibrationReader:
    """Feeds ONNX Runtime's calibrator batches of rows from the training side of a dataset.

    A ``CalibrationDataReader`` by duck type (``get_next``), so onnxruntime.quantization (a
    second of imports) loads only when a variant is built. ``splits`` names where the rows came from and is
    checked, so no caller can calibrate on the test split by mistake.
    """

    def __init__(self, rows: np.ndarray, splits: Sequence[str], input_name: str = INPUT_NAME,
                 batch_size: int = 32) -> None:
        bad = [name for name in splits if name not in CALIBRATION_SPLITS]
        if bad:
            raise ValueError(f"calibration rows must come from {' or '.join(CALIBRATION_SPLITS)}, not {bad}: "
                             "the test split scores the variant")
        self.rows = np.ascontiguousarray(rows, dtype=np.float32)
        self.splits = tuple(splits)
        self.input_name = input_name
        self.batch_size = batch_size
        self._batches: Iterator[dict[str, np.ndarray]] = iter(())
        self.rewind()

    def rewind(self) -> None:
        self._batches = iter([{self.input_name: self.rows[i:i + self.batch_size]}
                              for i in range(0, len(self.rows), self.batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def describe(self) -> dict[str, Any]:
        return {"splits": list(self.splits), "rows": int(len(self.rows))}


def calibration_reader(dataset: Dataset, limit: int = CALIBRATION_ROWS, seed: int = 0) -> CalibrationReader:
    """Up to ``limit`` rows drawn (seeded) from the training split, topped up from validation if it is short."""
    rng = np.random.default_rng(seed)
    parts, used = [], []
    for name in CALIBRATION_SPLITS:
        split = dataset.splits.get(name)
        wanted = limit - sum(len(p) for p in parts)
        if split is None or wanted <= 0 or len(split) == 0:
            continue
        picked = np.sort(rng.choice(len(split), size=min(wanted, len(split)), replace=False))
        parts.append(np.asarray(split.x[picked], dtype=np.float32))  # sorted: memory-mapped shards read in order
        used.append(name)
    if not parts:
        raise ValueError("the dataset has no training or validation rows to calibrate int8 on")
    return CalibrationReader(np.concatenate(parts), used)


# --- building ---------------------------------------------------------------------------------


def _graph_ops(proto: Any) -> set[str]:
    ops = set()
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            ops.add(node.op_type)
            graphs.extend(attr.g for attr in node.attribute if attr.HasField("g"))
    return ops


def why_not(variant: str, ops: set[str], takes_lengths: bool, provider: str) -> str | None:
    """Why ``variant`` is not even built for this graph on ``provider``; None when it is worth trying."""
    if variant == "int8":
        recurrent = sorted(ops & RECURRENT_OPS)
        if recurrent:
            return (f"not quantized: the graph has recurrent layers ({', '.join(recurrent)}), which ONNX Runtime's "
                    "static int8 quantization leaves in float32 (only the layers around them would be int8); "
                    "serving fp32")
        if takes_lengths:
            return "not quantized: the graph takes lengths (a recurrent model on variable-length data); serving fp32"
    if variant == "fp16" and provider != CUDA:
        return NO_CUDA
    return None


def quantize_int8(source: Path, target: Path, reader: CalibrationReader, per_channel: bool = False,
                  provider: str = CPU) -> Path:
    """``source`` quantized to int8 (QDQ, static, ``reader``'s rows for the activation ranges) at ``target``.

    On the CPU: unsigned int8 activations and signed int8 weights, ONNX Runtime's advice for x86
    (VNNI or not, the gate measures which wins); on CUDA: signed for both, its advice for GPUs.
    The graph is first pre-processed (ORT's optimiser folds batch norms into convolutions and
    shapes are inferred) so that more of it can be quantized.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    with tempfile.TemporaryDirectory(prefix="fluxo-int8-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # Symbolic shape inference (sympy) takes seconds and helps transformer graphs, not these.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        reader.rewind()
        quantize_static(
            str(prepared), str(target), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
            activation_type=QuantType.QInt8 if provider == CUDA else QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibration_providers=[CPU],
        )
    return target


def convert_fp16(source: Path, target: Path) -> Path:
    """``source`` with float16 weights and arithmetic, its input and output still float32, at ``target``."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), str(target))
    return target


# --- measuring --------------------------------------------------------------------------------


def _session(path: Path, providers: Sequence[str]) -> Any:
    """A session configured as the service configures its own (one intra-op thread, no spinning)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), sess_options=session_options(1), providers=list(providers))


def paired_latency(first: Any, second: Any, x: np.ndarray, batch_size: int, budget_s: float = TIMING_BUDGET_S,
                   min_rounds: int = 20, max_rounds: int = 5000) -> tuple[float, float]:
    """Median milliseconds of one run of each session on the same ``batch_size`` rows, runs alternated.

    On a shared machine the load changes from one second to the next; alternating the two
    (and which goes first each round) puts both under the same load, so their ratio holds
    even when the absolute numbers move.
    """
    rows = np.resize(np.arange(len(x)), batch_size)  # repeats rows when the split is smaller than the batch
    batch = np.ascontiguousarray(np.asarray(x[rows], dtype=np.float32))
    feeds = [graph_feeds(session, INPUT_NAME, batch) for session in (first, second)]
    sessions = (first, second)
    for _ in range(3):  # arena sizing and kernel selection happen on the first runs of a shape
        for session, feed in zip(sessions, feeds):
            session.run(None, feed)
    times: tuple[list[float], list[float]] = ([], [])
    started = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - started < budget_s):
        order = (0, 1) if rounds % 2 == 0 else (1, 0)
        for which in order:
            begun = time.perf_counter()
            sessions[which].run(None, feeds[which])
            times[which].append(time.perf_counter() - begun)
        rounds += 1
    return float(np.median(times[0]) * 1000), float(np.median(times[1]) * 1000)


def _gate(accuracy_drop: float, speedup: float, provider: str, settings: ExportSettings) -> tuple[bool, str]:
    reasons = []
    if accuracy_drop > settings.max_accuracy_drop:
        reasons.append(f"test accuracy {accuracy_drop:.2f} points below fp32's is more than "
                       f"export.max_accuracy_drop {settings.max_accuracy_drop:g}")
    if speedup < settings.min_speedup:
        reasons.append(f"speedup {speedup:.2f}x at batch {SPEEDUP_BATCH} is below export.min_speedup "
                       f"{settings.min_speedup:g}x")
    if reasons:
        return False, f"{'; '.join(reasons)} (on {provider})"
    return True, (f"kept: {speedup:.2f}x the fp32 speed at batch {SPEEDUP_BATCH} on {provider} "
                  f"(export.min_speedup {settings.min_speedup:g}x), test accuracy drop {accuracy_drop:+.2f} points "
                  f"against fp32 (export.max_accuracy_drop {settings.max_accuracy_drop:g})")


@dataclass
class _Reference:
    """The fp32 graph on the serving provider: what every variant is compared with."""

    path: Path
    session: Any
    logits: np.ndarray
    accuracy: float
    size_bytes: int
    x: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)
    lengths: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class _Scored:
    """A built variant's answers on the test split, before it is timed."""

    path: Path
    session: Any
    logits: np.ndarray
    accuracy: float | None  # None when its logits are not all finite
    accuracy_drop: float | None  # points against fp32's


def _score(path: Path, reference: _Reference, providers: Sequence[str]) -> _Scored:
    session = _session(path, providers)
    logits = session_logits(session, reference.x, lengths=reference.lengths)
    if not np.isfinite(logits).all():
        return _Scored(path, session, logits, None, None)
    accuracy = float((logits.argmax(1) == reference.y).mean())
    return _Scored(path, session, logits, accuracy, (reference.accuracy - accuracy) * 100)


def _decide(scored: _Scored, reference: _Reference, provider: str, settings: ExportSettings, budget_s: float,
            **extra: Any) -> VariantDecision:
    """Time a scored variant against fp32 at each of LATENCY_BATCHES and apply the gate to its numbers."""
    size = scored.path.stat().st_size
    if scored.accuracy_drop is None:
        return VariantDecision(False, f"refused: its logits on the test split are not all finite (on {provider})",
                               provider, size_bytes=size, fp32_size_bytes=reference.size_bytes, **extra)
    latency = {batch: paired_latency(reference.session, scored.session, reference.x, batch, budget_s)
               for batch in LATENCY_BATCHES}
    speedups = {batch: fp32_ms / max(variant_ms, 1e-9) for batch, (fp32_ms, variant_ms) in latency.items()}
    kept, reason = _gate(scored.accuracy_drop, speedups[SPEEDUP_BATCH], provider, settings)
    return VariantDecision(
        kept=kept, reason=reason, provider=provider,
        test_accuracy=scored.accuracy, fp32_test_accuracy=reference.accuracy,
        accuracy_drop=round(scored.accuracy_drop, 4),
        latency_ms_batch1=latency[1][1], latency_ms_batch32=latency[32][1],
        fp32_latency_ms_batch1=latency[1][0], fp32_latency_ms_batch32=latency[32][0],
        speedup=round(speedups[SPEEDUP_BATCH], 4), speedup_batch1=round(speedups[1], 4),
        max_abs_diff=float(np.abs(scored.logits - reference.logits).max()),
        argmax_agreement=float((scored.logits.argmax(1) == reference.logits.argmax(1)).mean()),
        size_bytes=size, fp32_size_bytes=reference.size_bytes, **extra,
    )


def _int8(reference: _Reference, scratch: Path, dataset: Dataset, providers: Sequence[str], settings: ExportSettings,
          budget_s: float, seed: int) -> tuple[VariantDecision, Path]:
    """Weights per tensor; per channel too when per tensor loses more accuracy than allowed: the better one is timed."""
    reader = calibration_reader(dataset, seed=seed)
    tried: list[tuple[bool, _Scored]] = []
    for per_channel in (False, True):
        path = quantize_int8(reference.path, scratch / f"int8-{'channel' if per_channel else 'tensor'}.onnx",
                             reader, per_channel, providers[0])
        tried.append((per_channel, _score(path, reference, providers)))
        drop = tried[-1][1].accuracy_drop
        if drop is not None and drop <= settings.max_accuracy_drop:
            break
    per_channel, best = min(tried, key=lambda pair: np.inf if pair[1].accuracy_drop is None else pair[1].accuracy_drop)
    decision = _decide(best, reference, providers[0], settings, budget_s, per_channel=per_channel,
                       calibration=reader.describe())
    return decision, best.path


def _reference(fp32: Path, dataset: Dataset, providers: Sequence[str], takes_lengths: bool) -> _Reference:
    test = dataset.splits["test"]
    session = _session(fp32, providers)
    x = np.asarray(test.x, dtype=np.float32)
    y = np.asarray(test.y)
    lengths = test.lengths if takes_lengths else None
    logits = session_logits(session, x, lengths=lengths)
    return _Reference(fp32, session, logits, float((logits.argmax(1) == y).mean()), fp32.stat().st_size, x, y, lengths)


def compare(fp32: Path, variant: Path, dataset: Dataset, settings: ExportSettings, *, takes_lengths: bool = False,
            providers: Sequence[str] | None = None, budget_s: float = TIMING_BUDGET_S) -> VariantDecision:
    """The gate's numbers and verdict for a graph built elsewhere, against ``fp32``; writes nothing.

    For benchmarks: what a variant export does not build would have measured (an int8 GRU,
    fp16 on a CPU), by exactly the checks and timing :func:`build_variants` uses.
    """
    providers = list(providers or choose_providers())
    reference = _reference(Path(fp32), dataset, providers, takes_lengths)
    return _decide(_score(Path(variant), reference, providers), reference, providers[0], settings, budget_s)


def build_variants(
    model_dir: Path, dataset: Dataset, settings: ExportSettings, *, takes_lengths: bool = False,
    providers: Sequence[str] | None = None, budget_s: float = TIMING_BUDGET_S, seed: int = 0,
) -> dict[str, VariantDecision]:
    """Try each of ``settings.variants`` on ``model_dir/model.onnx``; write the kept ones beside it.

    ``model_dir`` is export's staging directory, so a kept ``model.<variant>.onnx`` appears
    with the rest of the directory or not at all. ``providers`` defaults to what a server on
    this machine would pick (serving.runtime.choose_providers). A variant that cannot be built
    is refused with the error as its reason: the fp32 model is exported regardless.
    """
    import onnx

    model_dir = Path(model_dir)
    providers = list(providers or choose_providers())
    provider = providers[0]
    wanted = [name for name in settings.variants if name in VARIANTS[1:]]
    if not wanted:
        return {}
    fp32 = model_dir / variant_file("fp32")
    ops = _graph_ops(onnx.load(str(fp32)))
    decisions: dict[str, VariantDecision] = {}
    to_build = []
    for name in wanted:
        reason = why_not(name, ops, takes_lengths, provider)
        if reason is None:
            to_build.append(name)
        else:
            decisions[name] = VariantDecision(False, reason, provider)
    if not to_build:
        return {name: decisions[name] for name in wanted}
    reference = _reference(fp32, dataset, providers, takes_lengths)
    with tempfile.TemporaryDirectory(prefix=".variants-", dir=model_dir.parent) as scratch:
        for name in to_build:
            started = time.perf_counter()
            try:
                if name == "int8":
                    decision, path = _int8(reference, Path(scratch), dataset, providers, settings, budget_s, seed)
                else:
                    path = convert_fp16(fp32, Path(scratch) / "fp16.onnx")
                    decision = _decide(_score(path, reference, providers), reference, provider, settings, budget_s)
            except Exception as error:  # noqa: BLE001 - onnxruntime raises many types; the fp32 export goes on
                log.warning("variant %s of %s could not be built: %s", name, model_dir, error)
                first_line = (str(error).strip().splitlines() or [""])[0][:300]
                decisions[name] = VariantDecision(False, f"not built: {type(error).__name__}: {first_line}", provider)
                continue
            if decision.kept:
                shutil.move(str(path), model_dir / variant_file(name))
                decision = replace(decision, file=variant_file(name))
            decisions[name] = decision
            log.info("variant %s: %s (%.1f s)", name, decision.reason, time.perf_counter() - started)
    return {name: decisions[name] for name in wanted}


def as_metadata(decisions: Mapping[str, VariantDecision]) -> dict[str, dict[str, Any]]:
    """``ModelMetadata.variants``: each decision as a plain dict."""
    return {name: decision.as_dict() for name, decision in decisions.items()}


NUMBERS = ("test_accuracy", "accuracy_drop", "speedup", "speedup_batch1", "latency_ms_batch1", "latency_ms_batch32",
           "fp32_latency_ms_batch1", "fp32_latency_ms_batch32", "max_abs_diff", "argmax_agreement", "size_bytes")


def log_decisions(decisions: Mapping[str, VariantDecision]) -> None:
    """Log every decision to the active MLflow run: ``variant_<name>_<number>`` metrics and export/variants.json."""
    import mlflow

    if not decisions:
        return
    metrics: dict[str, float] = {}
    for name, decision in decisions.items():
        metrics[f"variant_{name}_kept"] = float(decision.kept)
        values = decision.as_dict()
        metrics |= {f"variant_{name}_{key}": float(values[key]) for key in NUMBERS if key in values}
    mlflow.log_metrics(metrics)
    mlflow.log_dict(as_metadata(decisions), "export/variants.json")


__all__ = [
    "CALIBRATION_ROWS", "CALIBRATION_SPLITS", "LATENCY_BATCHES", "SPEEDUP_BATCH", "CalibrationReader",
    "VariantDecision", "as_metadata", "build_variants", "calibration_reader", "compare", "convert_fp16", "log_decisions",
    "paired_latency", "quantize_int8", "why_not",
]
