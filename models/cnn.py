"""Convolutional models: a small 2-D CNN for images, a 1-D CNN for sequences, an MLP baseline.

Inputs are channels-first: images ``(B, C, H, W)``, sequences ``(B, C, L)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from models.registry import register_model


class CNN2d(nn.Module):
    """Two conv blocks (conv → BN → ReLU, the second pooled) and a linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int, dropout: float) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * channels, 2 * channels, 3, padding=1),
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(),
            # Global pooling keeps the head independent of the image size.
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class CNN1d(nn.Module):
    """The MNIST-1D paper's CNN: three stride-2 convolutions, then a linear layer over all positions."""

    def __init__(self, in_channels: int, length: int, num_classes: int, channels: int, dropout: float) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, channels, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, length)).numel()
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(flat, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """Fully connected baseline over the flattened input."""

    def __init__(self, in_features: int, num_classes: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _expect_rank(name: str, input_shape: tuple[int, ...], rank: int, layout: str) -> None:
    if len(input_shape) != rank:
        raise ValueError(f"model {name!r} expects input shaped {layout}, got {input_shape}")


@register_model("cnn2d", input_kind="image")
def build_cnn2d(
    input_shape: tuple[int, ...], num_classes: int, channels: int = 32, dropout: float = 0.2
) -> nn.Module:
    """Small 2-D CNN for (C, H, W) images."""
    _expect_rank("cnn2d", input_shape, 3, "(C, H, W)")
    return CNN2d(input_shape[0], num_classes, channels, dropout)


@register_model("cnn1d", input_kind="sequence")
def build_cnn1d(
    input_shape: tuple[int, ...], num_classes: int, channels: int = 25, dropout: float = 0.0
) -> nn.Module:
    """The MNIST-1D paper's 1-D CNN for (C, L) sequences."""
    _expect_rank("cnn1d", input_shape, 2, "(C, L)")
    return CNN1d(input_shape[0], input_shape[1], num_classes, channels, dropout)


@register_model("mlp", input_kind="any")
def build_mlp(
    input_shape: tuple[int, ...], num_classes: int, hidden: int = 100, dropout: float = 0.0
) -> nn.Module:
    """Two-hidden-layer MLP baseline for any input shape."""
    return MLP(math.prod(input_shape), num_classes, hidden, dropout)
