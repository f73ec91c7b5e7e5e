"""Does the ONNX graph compute what the PyTorch model computes? Checked on the test split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from serving.scoring import ParityReport, onnx_batches

__all__ = ["ParityReport", "check_parity"]


def check_parity(
    model: nn.Module, onnx_path: Path, x: np.ndarray, atol: float, batch_size: int = 512,
    lengths: np.ndarray | None = None,
) -> ParityReport:
    """Max abs logit difference and argmax agreement between PyTorch and ONNX Runtime (CPU).

    With ``lengths`` both run on each sequence's own length: the PyTorch model packed, as trained.
    """
    model = model.to("cpu").eval()
    worst, agree = 0.0, 0
    for rows, batch, onnx_logits in onnx_batches(onnx_path, x, batch_size, lengths):
        with torch.no_grad():
            if lengths is None:
                torch_logits = model(torch.from_numpy(batch)).numpy()
            else:
                torch_logits = model(torch.from_numpy(batch), torch.as_tensor(np.asarray(lengths)[rows])).numpy()
        worst = max(worst, float(np.abs(onnx_logits - torch_logits).max()))
        agree += int((onnx_logits.argmax(1) == torch_logits.argmax(1)).sum())
    return ParityReport(len(x), worst, agree / max(len(x), 1), atol)
