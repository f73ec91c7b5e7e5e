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


def slow_classifier(input_shape: Sequence[int], n_labels: int, width: int = 1024, depth: int = 24,
                    seed: int = 0) -> onnx.ModelProto:
    """A deep MLP (one shared hidden weight, so the file stays small) whose cost grows with the batch.

    For the timeout, concurrency-limit and drain tests, which need requests that
    take a while; the tests measure it first and size their requests to match.
    """
    rng = np.random.default_rng(seed)
    n_in = int(np.prod(input_shape))
    inits = [numpy_helper.from_array(rng.normal(0, 0.05, (n_in, width)).astype(np.float32), "w_in"),
             numpy_helper.from_array(rng.normal(0, 1 / np.sqrt(width), (width, width)).astype(np.float32), "w")]
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "w_in"], ["h0"])]
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]))
    inits.append(numpy_helper.from_array(rng.normal(0, 1.0, (width, n_labels)).astype(np.float32), "w_out"))
    nodes.append(helper.make_node("MatMul", [f"h{depth}", "w_out"], ["logits"]))
    graph = helper.make_graph(
        nodes, "fluxo_slow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *input_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_labels])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="fluxo-tests")
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def build_slow_model_dir(path: Path, width: int = 1024, depth: int = 24, **metadata_overrides: Any) -> Path:
    """A model directory holding :func:`slow_classifier` for (1, 8, 8) digit-like inputs."""
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(slow_classifier((1, 8, 8), len(DIGIT_LABELS), width, depth), str(path / "model.onnx"))
    meta = metadata_for((1, 8, 8), DIGIT_LABELS, **metadata_overrides)
    (path / "metadata.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return path


def digit_png(counts: np.ndarray, fmt: str = "PNG") -> bytes:
    """A 32x32 black-on-white bitmap whose 4x4 blocks hold ``counts`` (0..16) ink pixels each.

    That is how scikit-learn's digits were made, so the service's digits recipe
    must turn this file back into exactly ``counts``.
    """
    import io

    from PIL import Image

    counts = np.asarray(counts).reshape(8, 8).astype(int)
    bitmap = np.full((32, 32), 255, dtype=np.uint8)
    for i in range(8):
        for j in range(8):
            block = np.full(16, 255, dtype=np.uint8)
            block[: counts[i, j]] = 0
            bitmap[4 * i : 4 * i + 4, 4 * j : 4 * j + 4] = block.reshape(4, 4)
    buffer = io.BytesIO()
    Image.fromarray(bitmap).save(buffer, format=fmt)
    return buffer.getvalue()


class RunningServer:
    """`bentoml serve` on a free loopback port for a model dir or root; a context manager."""

    def __init__(self, model_dir: Path, env: dict[str, str], log_path: Path, timeout: float = 90.0) -> None:
        self.model_dir = model_dir
        self.env = env
        self.log_path = log_path
        self.timeout = timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: Any = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> RunningServer:
        from serving import ServingConfig, ServingError
        from serving.launch import start_server, wait_ready

        self._log_file = self.log_path.open("wb")
        # BentoML wipes $BENTOML_HOME/prometheus_multiproc_dir whenever a server starts, so a second server
        # on the same home (another test module, a colleague's run) would erase this one's /metrics counters.
        home = self.log_path.parent / f"bentoml-home-{self.port}"
        env = {"BENTOML_HOME": str(home), **self.env}
        self.process = start_server(ServingConfig.for_model_dir(self.model_dir), self.port, env=env,
                                    log_file=self._log_file)
        try:
            wait_ready(self.url, timeout=self.timeout, process=self.process)
        except ServingError as error:
            self.__exit__(None, None, None)
            raise RuntimeError(f"{error}\n--- server log ---\n{self.log()[-4000:]}") from error
        return self

    def __exit__(self, *exc: object) -> None:
        from serving.launch import stop_server

        if self.process is not None:
            stop_server(self.process)
        self._log_file.close()


def onnx_probabilities(model_dir: Path, batch: np.ndarray) -> np.ndarray:
    """Softmax of ``model_dir``'s graph run straight in onnxruntime: the reference a served answer must match."""
    import onnxruntime as ort

    from serving.runtime import CPU, softmax

    session = ort.InferenceSession(str(Path(model_dir) / "model.onnx"), providers=[CPU])
    return softmax(session.run(None, {"input": np.asarray(batch, dtype=np.float32)})[0])


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` in a Prometheus text page whose labels include ``labels`` (0 if none)."""
    import re

    total = 0.0
    for match in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.MULTILINE):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def scrape(url: str) -> str:
    """``GET /metrics``: the worker answering it has every worker write its tally first (serving/metrics.py),
    so every request answered before the scrape is in it."""
    import httpx

    return httpx.get(f"{url}/metrics", timeout=10).text
