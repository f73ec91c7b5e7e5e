"""Convolutional models: a small 2-D CNN for images, a 1-D CNN for sequences, an MLP baseline.

Inputs are channels-first: images ``(B, C, H, W)``, sequences ``(B, C, L)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from models.registry import expect_rank, register_model


class CNN2d(nn.Module):
    """Two conv blocks (conv → BN → ReLU, the second pooled) and a linear classifier.

    ``batch_norm=False`` swaps each BN for an identity in the same slot, so the
    default model's state-dict keys stay what older checkpoints hold.
    """

    def __init__(
        self, in_channels: int, num_classes: int, channels: int, dropout: float, batch_norm: bool = True
    ) -> None:
        super().__init__()

        def norm(width: int) -> nn.Module:
            return nn.BatchNorm2d(width) if batch_norm else nn.Identity()

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1),
            norm(channels),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            norm(2 * channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * channels, 2 * channels, 3, padding=1),
            norm(2 * channels),
            nn.ReLU(),
            # Global pooling keeps the head independent of the image size.
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class CNN1d(nn.Module):
    """The MNIST-1D paper's CNN: three stride-2 convolutions, then a linear layer over all positions.

    The paper's model has no normalisation; ``batch_norm=True`` adds BN after each
    convolution (whose bias BN would cancel, so it is dropped).
    """

    def __init__(
        self,
        in_channels: int,
        length: int,
        num_classes: int,
        channels: int,
        dropout: float,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for kernel, width_in in [(5, in_channels), (3, channels), (3, channels)]:
            layers.append(nn.Conv1d(width_in, channels, kernel, stride=2, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(channels))
            layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        # Eval mode so the probe leaves BN's running statistics untouched.
        with torch.no_grad():
            flat = self.features.eval()(torch.zeros(1, in_channels, length)).numel()
        self.features.train()
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(flat, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """Fully connected baseline over the flattened input.

    With ``batch_norm`` each hidden layer is linear → BN → ReLU → dropout; the
    linear bias is dropped there because BN's shift replaces it.
    """

    def __init__(
        self, in_features: int, num_classes: int, hidden: int, dropout: float, batch_norm: bool = False
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for width_in in (in_features, hidden):
            layers.append(nn.Linear(width_in, hidden, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden))
            layers += [nn.ReLU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(hidden, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_model("cnn2d", input_kind="image")
def build_cnn2d(
    input_shape: tuple[int, ...],
    num_classes: int,
    channels: int = 32,
    dropout: float = 0.2,
    batch_norm: bool = True,
) -> nn.Module:
    """Small 2-D CNN for (C, H, W) images."""
    expect_rank("cnn2d", input_shape, 3, "(C, H, W)")
    return CNN2d(input_shape[0], num_classes, channels, dropout, batch_norm)


@register_model("cnn1d", input_kind="sequence")
def build_cnn1d(
    input_shape: tuple[int, ...],
    num_classes: int,
    channels: int = 25,
    dropout: float = 0.0,
    batch_norm: bool = False,
) -> nn.Module:
    """The MNIST-1D paper's 1-D CNN for (C, L) sequences."""
    expect_rank("cnn1d", input_shape, 2, "(C, L)")
    return CNN1d(input_shape[0], input_shape[1], num_classes, channels, dropout, batch_norm)


@register_model("mlp", input_kind="any")
def build_mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: int = 100,
    dropout: float = 0.0,
    batch_norm: bool = False,
) -> nn.Module:
    """Two-hidden-layer MLP baseline for any input shape."""
    return MLP(math.prod(input_shape), num_classes, hidden, dropout, batch_norm)
