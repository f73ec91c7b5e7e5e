"""The served model's own embedding: the graph's input to its last linear layer, as a second output.

Drift in raw pixels or time steps is drift in thousands of correlated, mostly irrelevant
dimensions; two-sample tests there have little power (bench/drift.py measures it). The
features the classifier's head reads are few (84 for LeNet, the hidden state for a GRU)
and they are what the answers depend on. Every fluxo model ends in a ``Linear`` head, which
the ONNX exporter writes as ``Gemm`` (or ``MatMul`` + ``Add``) producing ``logits``; its
first input is the embedding. The graph is copied with that tensor added as an output, so
the embedding comes from the very graph being served, in the same ONNX Runtime run as the
probabilities.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.contract import INPUT_NAME, OUTPUT_NAME, TableInput

log = logging.getLogger(__name__)

EMBEDDING_NAME = "fluxo_embedding"


def embedding_tensor(graph: object) -> str | None:
    """The name of the tensor the head reads, or None when the graph does not end in a linear layer.

    A regression table model answers in the target's units (``head * std + mean`` after the
    head, models/preprocess.py): such elementwise steps with a constant are walked back through.
    """
    producers = {out: node for node in graph.node for out in node.output}  # type: ignore[attr-defined]
    constants = {init.name for init in graph.initializer}  # type: ignore[attr-defined]
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}  # type: ignore[attr-defined]
    node = producers.get(OUTPUT_NAME)
    for _ in range(8):  # a few rescaling steps at most
        if node is None or node.op_type not in _RESCALING:
            break
        if node.op_type == "Add":  # MatMul + Add: the head itself
            matmul = next((producers[i] for i in node.input if i in producers and producers[i].op_type == "MatMul"),
                          None)
            if matmul is not None:
                node = matmul
                break
        computed = [i for i in node.input if i not in constants]
        node = producers.get(computed[0]) if len(computed) == 1 else None
    if node is None or node.op_type not in ("Gemm", "MatMul"):
        return None
    return str(node.input[0])


# Elementwise steps with a constant between the head and the output (a regression target's rescaling).
_RESCALING = ("Add", "Mul", "Sub", "Div", "Reshape", "Identity", "Squeeze", "Unsqueeze")


def with_embedding_output(onnx_path: Path | str) -> tuple[bytes, bool]:
    """The serialized graph with the head's input as a second output, and whether one was found.

    Without a linear head (a graph fluxo did not export) the logits stand in for the embedding.
    """
    import onnx

    model = onnx.load(str(onnx_path))
    name = embedding_tensor(model.graph)
    if name is None:
        log.warning("%s: no linear layer produces %r; drift is measured on the logits", onnx_path, OUTPUT_NAME)
        return model.SerializeToString(), False
    model.graph.node.append(onnx.helper.make_node("Identity", [name], [EMBEDDING_NAME]))
    model.graph.output.append(onnx.helper.make_tensor_value_info(EMBEDDING_NAME, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString(), True


@dataclass
class Embedded:
    """What the served graph makes of a set of inputs: embeddings and class probabilities (or predicted values)."""

    embeddings: np.ndarray  # (n, d) float32
    probabilities: np.ndarray  # (n, classes) float32; (n, 0) for a regression model
    values: np.ndarray | None = None  # (n,) float32: a regression model's predictions; None for a classifier


class Embedder:
    """One ONNX Runtime session (CPU) of the served graph with its embedding exposed.

    ``task``: the model's (metadata.json); a regression graph's output is its predicted value, not logits.
    ``table``: a table model's columns. Its graph imputes empty cells itself; should a row still come
    out NaN (a graph that does not impute), that row is embedded again with each empty number cell
    set to the column's training median (an empty category to -1, no category), so that no NaN reaches
    a test (where it would read as no drift).
    """

    def __init__(self, onnx_path: Path | str, batch_size: int = 512, task: str | None = None,
                 table: TableInput | None = None) -> None:
        import onnxruntime as ort

        graph, self.has_head = with_embedding_output(onnx_path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.outputs = [OUTPUT_NAME, EMBEDDING_NAME] if self.has_head else [OUTPUT_NAME]
        self.batch_size = batch_size
        self.regression = task == "regression"
        self.table = table

    def __call__(self, x: np.ndarray, lengths: np.ndarray | None = None) -> Embedded:
        """``lengths`` for a graph that takes them (zero-padded sequences); without, NaN padding is read as such."""
        seen = self._run(x, lengths)
        if self.table is None or not len(x):
            return seen
        outputs = seen.values.reshape(len(x), -1) if seen.values is not None else seen.probabilities
        broken = ~(np.isfinite(seen.embeddings).all(axis=1) & np.isfinite(outputs).all(axis=1))
        if broken.any():
            log.warning("the graph answers NaN for %d of %d table rows; those are embedded with empty number "
                        "cells set to the training medians", int(broken.sum()), len(x))
            again = self._run(impute_medians(np.asarray(x)[broken], self.table))
            seen.embeddings[broken] = again.embeddings
            seen.probabilities[broken] = again.probabilities
            if seen.values is not None and again.values is not None:
                seen.values[broken] = again.values
        return seen

    def _run(self, x: np.ndarray, lengths: np.ndarray | None = None) -> Embedded:
        from serving.runtime import graph_feeds

        embeddings, outputs = [], []
        for start in range(0, len(x), self.batch_size):
            batch = np.ascontiguousarray(x[start:start + self.batch_size], dtype=np.float32)
            rows = None if lengths is None else np.asarray(lengths)[start:start + self.batch_size]
            results = self.session.run(self.outputs, graph_feeds(self.session, INPUT_NAME, batch, rows))
            embeddings.append(results[-1].reshape(len(batch), -1))
            outputs.append(results[0].reshape(len(batch), -1))
        if not embeddings:
            return Embedded(np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32),
                            np.zeros(0, np.float32) if self.regression else None)
        embedded, out = np.concatenate(embeddings).astype(np.float32), np.concatenate(outputs)
        if self.regression:
            return Embedded(embedded, np.zeros((len(out), 0), np.float32), out[:, 0].astype(np.float32))
        return Embedded(embedded, _softmax(out))


def impute_medians(x: np.ndarray, table: TableInput) -> np.ndarray:
    """Table rows with each empty number cell set to its column's training median (0 where none is recorded),
    and each empty category cell to -1: no category, as the served graph's one-hot reads NaN."""
    filled = np.array(x, dtype=np.float32, copy=True)
    for index, column in enumerate(table.columns):
        cells = filled[:, index]
        if column.type == "number":
            cells[np.isnan(cells)] = column.median if column.median is not None else 0.0
        else:
            cells[np.isnan(cells)] = -1.0
    return filled


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
