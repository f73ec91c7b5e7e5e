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

from serving.contract import INPUT_NAME, LENGTHS_NAME, OUTPUT_NAME  # the names the service reads

log = logging.getLogger(__name__)


class TwoClassLogits(nn.Module):
    """A binary model's single logit z as [0, z]: softmax then gives [1 − σ(z), σ(z)],
    so the service treats it like any classifier over two labels."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        z = (self.inner(x) if lengths is None else self.inner(x, lengths)).reshape(-1, 1)
        return torch.cat([torch.zeros_like(z), z], dim=1)


def servable(model: nn.Module, task: str) -> nn.Module:
    """The module whose outputs the service reads: logits to softmax over the labels, or (regression)
    one value per instance in the target's units."""
    from pipelines.errors import FluxoError

    if task == "binary":
        return TwoClassLogits(model).eval()
    if task in ("multiclass", "regression", None):
        return model
    raise FluxoError(
        f"a {task} model trains and is tracked in MLflow, but export for serving supports classifiers and "
        "regression only so far; keep the run's checkpoint artifact"
    )


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path, opset: int,
                with_lengths: bool = False) -> onnx.ModelProto:
    """Export ``model`` (eval mode, on the CPU) to a single self-contained ``.onnx`` file.

    ``with_lengths``: the graph takes a second input, ``lengths`` (int64, one per instance: the
    valid steps of each zero-padded sequence), for a model whose ``forward(x, lengths)`` uses it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    example = torch.zeros(2, *input_shape)
    batch = torch.export.Dim("batch")
    inputs: tuple[torch.Tensor, ...] = (example,)
    names, dynamic = [INPUT_NAME], {"x": {0: batch}}
    if with_lengths:
        inputs = (example, torch.tensor([input_shape[-1], max(1, input_shape[-1] // 2)], dtype=torch.int64))
        names, dynamic = [INPUT_NAME, LENGTHS_NAME], {"x": {0: batch}, "lengths": {0: batch}}
    chatter = io.StringIO()
    # The exporter prints progress lines and warnings about optional torchvision ops.
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            inputs,
            str(path),
            input_names=names,
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic,
            opset_version=opset,
            dynamo=True,
            external_data=False,
        )
    log.debug("torch.onnx: %s", chatter.getvalue().strip())
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    log.info("exported %s (opset %d, %.1f kB)", path, opset, path.stat().st_size / 1024)
    return proto


def lengths_graph(model: nn.Module, variable_length: bool) -> nn.Module | None:
    """For variable-length data and a recurrent model: the same network as a graph that takes ``lengths``.

    ``model`` is the rebuilt :class:`models.preprocess.Standardized`; None when the graph
    needs no lengths (fixed-length data, or a convolutional model that reads the padding).
    """
    from models.preprocess import Standardized
    from models.rnn import LengthAwareRecurrent, RecurrentClassifier

    if not variable_length or not isinstance(model.inner, RecurrentClassifier):
        return None
    return Standardized(LengthAwareRecurrent(model.inner), model.mean.flatten().tolist() if model.mean.ndim else
                        float(model.mean), model.std.flatten().tolist() if model.std.ndim else float(model.std)).eval()
