"""Preprocessing baked into the network, so the exported ONNX graph takes raw inputs: one
standardisation for images and sequences, per-column encoding and scaling for tables."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn


class Standardized(nn.Module):
    """``inner((x - mean) / std)`` with the training set's statistics stored as buffers.

    Baking the statistics into the module means checkpoints, ONNX exports and the
    service all agree on preprocessing without a separate step that could drift. ``mean``
    and ``std`` are one number, or one per channel of a (C, L) sequence (shaped (C, 1)
    inside, so they broadcast over the steps).
    """

    def __init__(self, inner: nn.Module, mean: float | Sequence[float], std: float | Sequence[float]) -> None:
        super().__init__()
        self.inner = inner
        center, scale = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        if center.ndim:
            center, scale = center.reshape(-1, 1), scale.reshape(-1, 1)
        self.register_buffer("mean", center)
        self.register_buffer("std", torch.where(scale > 0, scale, torch.ones_like(scale)))
        # Recurrent models use sequence lengths; convolutional ones see the zero padding as signal.
        self.takes_lengths = "lengths" in inspect.signature(inner.forward).parameters

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        scaled = (x - self.mean) / self.std
        # Only recurrent models take lengths; the ONNX export traces the lengths=None path.
        if lengths is None or not self.takes_lengths:
            return self.inner(scaled)
        return self.inner(scaled, lengths=lengths)


class TableInput(nn.Module):
    """A table's raw columns (numbers, NaN for an empty cell, a text value's vocabulary index)
    → the features a network learns from, as part of the graph.

    Number columns: an empty cell takes the training median, then ``(x - center) / scale``;
    a column that had empty cells in training also adds a 0/1 missing-indicator. Text
    columns: one-hot over the vocabulary; an empty or unseen value (NaN) is all zeros.
    Everything is fitted on the training split and stored as buffers, so the exported
    graph, ``fluxo predict``, the gate and the monitor all read raw columns the same way.
    """

    def __init__(self, columns: list[dict[str, Any]]) -> None:
        super().__init__()
        numbers = [i for i, c in enumerate(columns) if c["type"] == "number"]
        flagged = [i for i in numbers if columns[i].get("missing")]

        def buffer(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32)

        self.register_buffer("numbers", torch.tensor(numbers, dtype=torch.long))
        self.register_buffer("flagged", torch.tensor(flagged, dtype=torch.long))
        self.register_buffer("median", buffer([columns[i].get("median", 0.0) for i in numbers]))
        self.register_buffer("center", buffer([columns[i].get("center", 0.0) for i in numbers]))
        self.register_buffer("scale", buffer([columns[i].get("scale", 1.0) or 1.0 for i in numbers]))
        self.categories = [(i, len(c["categories"])) for i, c in enumerate(columns) if c["type"] == "category"]
        self.out_features = len(numbers) + len(flagged) + sum(size for _, size in self.categories)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        if len(self.numbers):
            values = x.index_select(1, self.numbers)
            values = torch.where(torch.isnan(values), self.median, values)
            parts.append((values - self.center) / self.scale)
        if len(self.flagged):
            parts.append(torch.isnan(x.index_select(1, self.flagged)).to(x.dtype))
        for index, size in self.categories:
            codes = torch.arange(size, dtype=x.dtype, device=x.device)
            parts.append((x[:, index : index + 1] == codes).to(x.dtype))  # NaN equals nothing: no category
        return torch.cat(parts, dim=1)


class TableModel(nn.Module):
    """``inner(TableInput(x))``, and for a regression target, the output back in the target's units.

    The network learns a standardised target (``(y - mean) / std`` of the training split),
    which a weight initialisation suits whatever the target's scale; the graph answers in
    the target's own units.
    """

    takes_lengths = False

    def __init__(self, inner: nn.Module, columns: list[dict[str, Any]],
                 target: dict[str, float] | None = None) -> None:
        super().__init__()
        self.encode = TableInput(columns)
        self.inner = inner
        self.rescaled = target is not None
        self.register_buffer("target_mean", torch.tensor(float((target or {}).get("mean", 0.0))))
        self.register_buffer("target_std", torch.tensor(float((target or {}).get("std", 1.0)) or 1.0))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        out = self.inner(self.encode(x))
        return out * self.target_std + self.target_mean if self.rescaled else out


class ColumnsAsSteps(nn.Module):
    """A table's columns read as the steps of one channel: ``(N, F) → (N, 1, F)``, for a sequence model
    raced on a table whose columns may be a sequence (the data's ``as_steps``).

    The graph still takes the table's rows, so the service, ``fluxo predict`` and the contract
    are the table's whichever kind of model won; the scaling in front (``Standardized``) is
    the one of sequences, over every value, which keeps the shape a step pattern has.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.unsqueeze(1))


def reads_steps(spec: dict[str, Any]) -> bool:
    """A sequence model trained on a table's columns as steps (see :class:`ColumnsAsSteps`)."""
    return spec.get("kind") == "table" and spec.get("input_kind") == "sequence"


def inner_input_shape(spec: dict[str, Any]) -> tuple[int, ...]:
    """The shape the network itself sees: a table's encoded width (or its columns as one channel's
    steps), else the input's own shape."""
    if reads_steps(spec):
        return (1, len(spec["table"]["columns"]))
    if spec.get("kind") == "table":
        return (TableInput(spec["table"]["columns"]).out_features,)
    return tuple(spec["input_shape"])


def wrap_model(inner: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """The network with its input preprocessing in front, as trained, checkpointed and exported."""
    if reads_steps(spec):
        return Standardized(ColumnsAsSteps(inner), spec["mean"], spec["std"])
    if spec.get("kind") == "table":
        return TableModel(inner, spec["table"]["columns"], spec["table"].get("target"))
    return Standardized(inner, spec["mean"], spec["std"])
