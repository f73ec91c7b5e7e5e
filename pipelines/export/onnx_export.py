"""PyTorch → ONNX with a dynamic batch axis, checked by ``onnx.checker``.

Inputs have a fixed per-instance shape (sequence length included): it is saved
in the metadata and the service enforces it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn as nn

from serving.contract import INPUT_NAME, OUTPUT_NAME  # the names the service reads

log = logging.getLogger(__name__)


class TwoClassLogits(nn.Module):
    """A binary model's single logit z as [0, z]: softmax then gives [1 − σ(z), σ(z)],
    so the service treats it like any classifier over two labels."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.inner(x).reshape(-1, 1)
        return torch.cat([torch.zeros_like(z), z], dim=1)


def servable(model: nn.Module, task: str) -> nn.Module:
    """The module whose logits the service can softmax over the labels."""
    from pipelines.errors import FluxoError

    if task == "binary":
        return TwoClassLogits(model).eval()
    if task in ("multiclass", None):
        return model
    raise FluxoError(
        f"a {task} model trains and is tracked in MLflow, but export for serving supports multiclass and binary "
        "classifiers only so far; keep the run's checkpoint artifact"
    )


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path, opset: int) -> onnx.ModelProto:
    """Export ``model`` (eval mode, on the CPU) to a single self-contained ``.onnx`` file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    example = torch.zeros(2, *input_shape)
    chatter = io.StringIO()
    # The exporter prints progress lines and warnings about optional torchvision ops.
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
            opset_version=opset,
            dynamo=True,
            external_data=False,
        )
    log.debug("torch.onnx: %s", chatter.getvalue().strip())
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    log.info("exported %s (opset %d, %.1f kB)", path, opset, path.stat().st_size / 1024)
    return proto
