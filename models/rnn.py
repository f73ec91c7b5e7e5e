"""Recurrent many-to-one classifiers for (C, L) sequences."""

from __future__ import annotations

import torch
import torch.nn as nn

from models.registry import register_model


class GRUClassifier(nn.Module):
    """GRU over time steps; the last hidden state (both directions if bidirectional) feeds a linear head."""

    def __init__(
        self, in_channels: int, num_classes: int, hidden: int, layers: int, bidirectional: bool, dropout: float
    ) -> None:
        super().__init__()
        self.rnn = nn.GRU(
            in_channels,
            hidden,
            num_layers=layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if layers > 1 else 0.0,
        )
        directions = 2 if bidirectional else 1
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(directions * hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, L) → (B, L, C): time runs along the sequence, channels are the features.
        _, hidden = self.rnn(x.transpose(1, 2))
        directions = 2 if self.rnn.bidirectional else 1
        last = hidden[-directions:].transpose(0, 1).reshape(x.shape[0], -1)
        return self.head(last)


@register_model("gru", input_kind="sequence")
def build_gru(
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: int = 64,
    layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.0,
) -> nn.Module:
    """Many-to-one GRU for (C, L) sequences."""
    if len(input_shape) != 2:
        raise ValueError(f"model 'gru' expects input shaped (C, L), got {input_shape}")
    return GRUClassifier(input_shape[0], num_classes, hidden, layers, bidirectional, dropout)
