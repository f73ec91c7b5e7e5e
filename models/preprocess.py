"""Preprocessing baked into the network, so the exported ONNX graph takes raw inputs."""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn


class Standardized(nn.Module):
    """``inner((x - mean) / std)`` with the training set's statistics stored as buffers.

    Baking the statistics into the module means checkpoints, ONNX exports and the
    service all agree on preprocessing without a separate step that could drift.
    """

    def __init__(self, inner: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std) if std > 0 else 1.0))
        # Recurrent models use sequence lengths; convolutional ones see the zero padding as signal.
        self.takes_lengths = "lengths" in inspect.signature(inner.forward).parameters

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        scaled = (x - self.mean) / self.std
        # Only recurrent models take lengths; the ONNX export traces the lengths=None path.
        if lengths is None or not self.takes_lengths:
            return self.inner(scaled)
        return self.inner(scaled, lengths=lengths)
