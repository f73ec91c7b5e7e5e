"""Residual networks: ``resnet_small`` for (C, H, W) images, ``resnet1d`` for (C, L) sequences.

One implementation serves both: the 1-D and 2-D nets differ only in which
conv/BN/pool classes they use. Each stage after the first halves the resolution
and the head global-average-pools, so the same net fits any input size and a
shift of the pattern (as in MNIST-1D) barely moves the logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from models.registry import expect_rank, register_model

_LAYERS: dict[int, tuple[type[nn.Module], type[nn.Module], type[nn.Module]]] = {
    1: (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d),
    2: (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d),
}


class BasicBlock(nn.Module):
    """Two conv → BN layers with a skip connection: ``relu(F(x) + shortcut(x))``.

    The identity skip lets gradients reach early layers undiminished; when the
    block changes width or resolution, a strided 1×1 conv projects the skip to match.
    """

    def __init__(self, dims: int, width_in: int, width_out: int, stride: int, kernel: int, batch_norm: bool) -> None:
        super().__init__()
        conv, norm, _ = _LAYERS[dims]

        def bn(width: int) -> nn.Module:
            return norm(width) if batch_norm else nn.Identity()

        bias = not batch_norm  # BN's shift makes a conv bias redundant
        self.conv1 = conv(width_in, width_out, kernel, stride=stride, padding=kernel // 2, bias=bias)
        self.bn1 = bn(width_out)
        self.conv2 = conv(width_out, width_out, kernel, padding=kernel // 2, bias=bias)
        self.bn2 = bn(width_out)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or width_in != width_out:
            self.shortcut = nn.Sequential(conv(width_in, width_out, 1, stride=stride, bias=bias), bn(width_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv → stages of BasicBlocks (each stage after the first downsamples by 2) → GAP → linear."""

    def __init__(
        self,
        dims: int,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int],
        blocks: Sequence[int],
        kernel: int,
        stem_kernel: int,
        dropout: float,
        batch_norm: bool,
    ) -> None:
        super().__init__()
        conv, norm, pool = _LAYERS[dims]
        self.stem = nn.Sequential(
            conv(in_channels, widths[0], stem_kernel, padding=stem_kernel // 2, bias=not batch_norm),
            norm(widths[0]) if batch_norm else nn.Identity(),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        width_in = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                stages.append(BasicBlock(dims, width_in, width, stride, kernel, batch_norm))
                width_in = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(pool(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(width_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def _stage_plan(
    name: str, channels: int | Sequence[int], blocks: int | Sequence[int], stages: int
) -> tuple[list[int], list[int]]:
    """``channels=c`` means widths c, 2c, 4c, ... (doubling per stage); ``blocks=n`` means n per stage."""
    widths = [channels * 2**i for i in range(stages)] if isinstance(channels, int) else [int(c) for c in channels]
    counts = [blocks] * len(widths) if isinstance(blocks, int) else [int(b) for b in blocks]
    if not widths or len(counts) != len(widths) or min(widths) < 1 or min(counts) < 1:
        raise ValueError(
            f"model {name!r}: channels {channels!r} and blocks {blocks!r} must give one positive width "
            "and one positive block count per stage"
        )
    return widths, counts


def _check_kernel(name: str, kernel: int) -> None:
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"model {name!r}: kernel sizes must be odd so padding keeps the length; got {kernel}")


@register_model("resnet_small", input_kind="image")
def build_resnet_small(
    input_shape: tuple[int, ...],
    num_classes: int,
    channels: int | Sequence[int] = 16,
    blocks: int | Sequence[int] = 1,
    dropout: float = 0.0,
    batch_norm: bool = True,
) -> nn.Module:
    """Small 2-D ResNet for (C, H, W) images: 3 stages, widths 16-32-64 by default (CIFAR-style)."""
    expect_rank("resnet_small", input_shape, 3, "(C, H, W)")
    widths, counts = _stage_plan("resnet_small", channels, blocks, stages=3)
    return ResNet(2, input_shape[0], num_classes, widths, counts, 3, 3, dropout, batch_norm)


@register_model("resnet1d", input_kind="sequence")
def build_resnet1d(
    input_shape: tuple[int, ...],
    num_classes: int,
    channels: int | Sequence[int] = 64,
    blocks: int | Sequence[int] = 1,
    kernel_size: int = 5,
    dropout: float = 0.0,
    batch_norm: bool = True,
) -> nn.Module:
    """1-D ResNet for (C, L) sequences such as MNIST-1D: stem + 2 stages, widths 64-128 by default."""
    expect_rank("resnet1d", input_shape, 2, "(C, L)")
    _check_kernel("resnet1d", kernel_size)
    widths, counts = _stage_plan("resnet1d", channels, blocks, stages=2)
    return ResNet(1, input_shape[0], num_classes, widths, counts, kernel_size, kernel_size, dropout, batch_norm)
