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

from serving.contract import INPUT_NAME, OUTPUT_NAME

log = logging.getLogger(__name__)

EMBEDDING_NAME = "fluxo_embedding"


def embedding_tensor(graph: object) -> str | None:
    """The name of the tensor the head reads, or None when the graph does not end in a linear layer."""
    producers = {out: node for node in graph.node for out in node.output}  # type: ignore[attr-defined]
    node = producers.get(OUTPUT_NAME)
    if node is not None and node.op_type == "Add":  # MatMul + Add: follow the MatMul side
        node = next((producers[i] for i in node.input if i in producers and producers[i].op_type == "MatMul"), None)
    if node is None or node.op_type not in ("Gemm", "MatMul"):
        return None
    return str(node.input[0])


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
    """What the served graph makes of a set of inputs: embeddings and class probabilities."""

    embeddings: np.ndarray  # (n, d) float32
    probabilities: np.ndarray  # (n, classes) float32


class Embedder:
    """One ONNX Runtime session (CPU) of the served graph with its embedding exposed."""

    def __init__(self, onnx_path: Path | str, batch_size: int = 512) -> None:
        import onnxruntime as ort

        graph, self.has_head = with_embedding_output(onnx_path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.outputs = [OUTPUT_NAME, EMBEDDING_NAME] if self.has_head else [OUTPUT_NAME]
        self.batch_size = batch_size

    def __call__(self, x: np.ndarray, lengths: np.ndarray | None = None) -> Embedded:
        """``lengths`` for a graph that takes them (zero-padded sequences); without, NaN padding is read as such."""
        from serving.runtime import graph_feeds

        embeddings, probabilities = [], []
        for start in range(0, len(x), self.batch_size):
            batch = np.ascontiguousarray(x[start:start + self.batch_size], dtype=np.float32)
            rows = None if lengths is None else np.asarray(lengths)[start:start + self.batch_size]
            results = self.session.run(self.outputs, graph_feeds(self.session, INPUT_NAME, batch, rows))
            logits = results[0]
            embeddings.append(results[-1].reshape(len(batch), -1))
            probabilities.append(_softmax(logits))
        if not embeddings:
            return Embedded(np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32))
        return Embedded(np.concatenate(embeddings).astype(np.float32), np.concatenate(probabilities))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
