"""LeNet-5 for (C, H, W) images, from 28×28 MNIST down to 8×8 digits.

LeNet-5's second convolution is "valid" (5×5, no padding), which needs at least
a 5×5 map after the first pooling. On smaller images it pads instead, so the
same architecture trains on the 8×8 digits; the classifier's input width is
measured from the built feature extractor, never hand-computed.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from models.registry import expect_rank, register_model

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}
MIN_SIDE = 4  # two 2× poolings of a 4×4 map still leave one pixel


class LeNet5(nn.Module):
    """conv(6, 5×5) → pool → conv(16, 5×5) → pool → fc 120 → fc 84 → classes.

    ReLU and max pooling by default (the modern reading); ``activation="tanh"``
    is closer to the 1998 network. BN, when on, follows every conv and hidden
    linear layer, whose biases it makes redundant.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        dropout: float,
        batch_norm: bool,
        activation: str,
    ) -> None:
        super().__init__()
        channels, height, width = input_shape
        act = ACTIVATIONS[activation]
        second_padding = 0 if min(height, width) // 2 >= 5 else 2
        self.features = nn.Sequential(
            *_block(nn.Conv2d(channels, 6, 5, padding=2, bias=not batch_norm), nn.BatchNorm2d(6), batch_norm, act),
            nn.MaxPool2d(2),
            *_block(nn.Conv2d(6, 16, 5, padding=second_padding, bias=not batch_norm), nn.BatchNorm2d(16), batch_norm, act),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        # Eval mode so the probe leaves BN's running statistics untouched.
        with torch.no_grad():
            flat = self.features.eval()(torch.zeros(1, *input_shape)).shape[1]
        self.features.train()
        self.classifier = nn.Sequential(
            *_block(nn.Linear(flat, 120, bias=not batch_norm), nn.BatchNorm1d(120), batch_norm, act),
            nn.Dropout(dropout),
            *_block(nn.Linear(120, 84, bias=not batch_norm), nn.BatchNorm1d(84), batch_norm, act),
            nn.Dropout(dropout),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _block(layer: nn.Module, norm: nn.Module, batch_norm: bool, act: type[nn.Module]) -> list[nn.Module]:
    return [layer, norm, act()] if batch_norm else [layer, act()]


@register_model("lenet", input_kind="image")
def build_lenet(
    input_shape: tuple[int, ...],
    num_classes: int,
    dropout: float = 0.0,
    batch_norm: bool = False,
    activation: str = "relu",
) -> nn.Module:
    """LeNet-5 for (C, H, W) images of at least 4×4 (8×8 digits, 28×28 MNIST)."""
    expect_rank("lenet", input_shape, 3, "(C, H, W)")
    if min(input_shape[1:]) < MIN_SIDE:
        raise ValueError(f"model 'lenet' needs images of at least {MIN_SIDE}x{MIN_SIDE}, got {input_shape}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"model 'lenet': activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    return LeNet5((input_shape[0], input_shape[1], input_shape[2]), num_classes, dropout, batch_norm, activation)
