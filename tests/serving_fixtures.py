"""Build a tiny model directory (model.onnx + metadata.json) for serving tests.

The graph is written with onnx.helper rather than exported from torch: it takes
milliseconds and keeps the serving tests independent of the training code,
while honouring the same contract as the export step (input "input",
output "logits", dynamic batch axis).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DIGIT_LABELS = [str(i) for i in range(10)]


def tiny_classifier(input_shape: Sequence[int], n_labels: int, seed: int = 0) -> onnx.ModelProto:
    """Flatten → Gemm → logits; weights large enough that different inputs pick different labels."""
    rng = np.random.default_rng(seed)
    n_in = int(np.prod(input_shape))
    weight = rng.normal(0.0, 1.0, size=(n_in, n_labels)).astype(np.float32)
    bias = rng.normal(0.0, 0.1, size=(n_labels,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits"]),
        ],
        "fluxo_tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *input_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_labels])],
        initializer=[numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="fluxo-tests")
    model.ir_version = 9  # readable by every onnxruntime the project allows
    onnx.checker.check_model(model)
    return model


def metadata_for(input_shape: Sequence[int], labels: Sequence[str], **overrides: Any) -> dict[str, Any]:
    """metadata.json as the export step writes it (serving/README.md)."""
    meta: dict[str, Any] = {
        "model_name": "fluxo",
        "model_version": "3",
        "architecture": "tiny-linear",
        "run_id": "0f3c0000",
        "dataset": "digits",
        "data_version": "4b1a0000c2.dir",
        "input_name": "input",
        "output_name": "logits",
        "input_shape": list(input_shape),
        "input_dtype": "float32",
        "labels": list(labels),
        "preprocessing": {"normalize": {"mean": 4.88, "std": 6.02}, "in_graph": True},
        "test_metrics": {"test_accuracy": 0.97, "test_f1_macro": 0.96},
        "onnx_opset": 18,
    }
    meta.update(overrides)
    return meta


def build_model_dir(
    path: Path,
    input_shape: Sequence[int] = (1, 8, 8),
    labels: Sequence[str] = DIGIT_LABELS,
    seed: int = 0,
    **metadata_overrides: Any,
) -> Path:
    """Write model.onnx and metadata.json into ``path`` (created) and return it."""
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(tiny_classifier(input_shape, len(labels), seed), str(path / "model.onnx"))
    meta = metadata_for(input_shape, labels, **metadata_overrides)
    (path / "metadata.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return path


def sample_instances(n: int, input_shape: Sequence[int] = (1, 8, 8), seed: int = 1) -> np.ndarray:
    """Digit-like raw values in [0, 16], as the digits dataset stores them."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 17, size=(n, *input_shape)).astype(np.float32)


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
