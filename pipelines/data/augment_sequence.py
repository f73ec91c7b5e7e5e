"""Sequence augmentation of a whole (B, C, L) batch on its own device, with plain torch ops.

Per-sample parameters are drawn as tensors and applied through ``gather`` and
elementwise ops, so there is no loop over samples and no host sync. Jitter is
a fraction of the batch's value range (max − min), like image noise.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from pipelines.settings.augment import SequenceAugment  # noqa: F401 - re-exported


def _time_warp(x: torch.Tensor, settings: SequenceAugment, generator: torch.Generator, n: torch.Tensor) -> torch.Tensor:
    """Resample each sequence along a smooth monotone path that keeps both ends of its valid steps in place."""
    batch, channels, length = x.shape
    knots = torch.rand(batch, 1, settings.warp_knots, generator=generator, device=x.device, dtype=x.dtype)
    speed = F.interpolate(1 + settings.warp * (2 * knots - 1), size=length - 1, mode="linear", align_corners=True)
    path = torch.cat([torch.zeros_like(speed[..., :1]), torch.cumsum(speed, -1)], -1)
    last = n - 1
    end = path.gather(2, last).clamp_min(torch.finfo(x.dtype).tiny)
    path = path * (last.to(x.dtype) / end)  # (B, 1, L), 0 → n-1 over each sample's valid steps (0 when n = 1)
    left = torch.minimum(path.floor(), (last - 1).clamp(min=0).to(x.dtype)).clamp(min=0)
    frac = (path - left).clamp(0, 1)
    index = left.long().clamp(0, length - 1)
    following = torch.minimum(index + 1, last)
    warped = torch.lerp(
        x.gather(2, index.expand(batch, channels, length)), x.gather(2, following.expand(batch, channels, length)), frac
    )
    return torch.where(_inside(n, length), warped, x)


def _shift(x: torch.Tensor, settings: SequenceAugment, generator: torch.Generator, n: torch.Tensor) -> torch.Tensor:
    """Move each sample by its own number of steps (positive: later in time), within its valid steps."""
    batch, channels, length = x.shape
    steps = torch.randint(-settings.shift, settings.shift + 1, (batch, 1, 1), generator=generator, device=x.device)
    source = torch.arange(length, device=x.device) - steps  # output t reads input t - steps
    if settings.shift_mode == "roll":
        moved = x.gather(2, (source % n).expand(batch, channels, length))
    else:
        kept = (source >= 0) & (source < n)
        moved = x.gather(2, source.clamp(0, length - 1).expand(batch, channels, length))
        moved = torch.where(kept, moved, torch.zeros_like(moved))
    return torch.where(_inside(n, length), moved, x)


def _mask(x: torch.Tensor, settings: SequenceAugment, generator: torch.Generator, n: torch.Tensor) -> torch.Tensor:
    batch, _, length = x.shape
    valid = n.to(x.dtype)
    u = torch.rand(batch, 3, 1, 1, generator=generator, device=x.device)
    span = (settings.mask_span[0] + (settings.mask_span[1] - settings.mask_span[0]) * u[:, 0]) * valid
    span = span.round().clamp(1, length)
    start = torch.floor(u[:, 1] * (valid - span + 1))
    steps = torch.arange(length, device=x.device)
    masked = (steps >= start) & (steps < start + span) & (u[:, 2] < settings.mask_prob) & _inside(n, length)
    if settings.mask_value == "mean":
        fill = x.sum(dim=2, keepdim=True) / valid  # padding is zero, so this is the mean of the valid steps
    else:
        fill = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(masked, fill, x)


def _inside(n: torch.Tensor, length: int) -> torch.Tensor:
    """(B, 1, L) mask of each sample's valid steps."""
    return torch.arange(length, device=n.device) < n


def augment_sequences(
    x: torch.Tensor, settings: SequenceAugment, generator: torch.Generator, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Warp → shift → amplitude → jitter → mask, for the whole batch; ``generator`` lives on x's device.

    ``lengths`` (valid steps per sample; None: all of them) keeps every op inside
    each sample's own steps: padding is never shifted, warped or masked into the
    signal, nor given jitter, so a variable-length RNN still reads a real sequence.
    """
    batch, _, length = x.shape
    if lengths is None:
        n = torch.full((batch, 1, 1), length, device=x.device, dtype=torch.long)
    else:
        n = lengths.to(device=x.device, dtype=torch.long).clamp(1, length).view(-1, 1, 1)
    low, high = torch.aminmax(x)
    span = high - low  # a 0-dim tensor: stays on the device, no sync
    if settings.warp > 0 and length > 1:
        x = _time_warp(x, settings, generator, n)
    if settings.shift > 0:
        x = _shift(x, settings, generator, n)
    if settings.amplitude != (1.0, 1.0):
        u = torch.rand(batch, 1, 1, generator=generator, device=x.device, dtype=x.dtype)
        x = x * (settings.amplitude[0] + (settings.amplitude[1] - settings.amplitude[0]) * u)
    if settings.jitter_std > 0:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + noise * _inside(n, length) * (settings.jitter_std * span)
    if settings.mask_prob > 0:
        x = _mask(x, settings, generator, n)
    return x


__all__ = ["SequenceAugment", "augment_sequences"]
