"""Image augmentation of a whole (B, C, H, W) batch on its own device, with plain torch ops.

Every random parameter is drawn per sample as a tensor on the batch's device,
so a batch costs a fixed handful of kernels (one ``affine_grid`` +
``grid_sample`` for all geometry, a few elementwise ops for the rest) and the
host never waits for the device. Additive magnitudes (brightness, noise) are
fractions of the batch's value range (max − min), so one setting suits the
0–16 pixels of ``digits``, [0, 1] images and standardised inputs alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pipelines.settings.augment import ImageAugment, check_range, symmetric_range  # noqa: F401 - re-exported

# RandomErasing's aspect-ratio range (torchvision's default): holes from tall to wide.
_ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))


def _uniform(u: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    return bounds[0] + (bounds[1] - bounds[0]) * u


def affine_theta(settings: ImageAugment, batch: int, height: int, width: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Per-sample (B, 2, 3) matrices for ``affine_grid``: output → input coordinates, normalised.

    The forward map is built in pixel units around the image centre (so
    rotation stays a rotation on non-square images) and inverted in closed
    form, which avoids ``linalg.inv`` and the device sync of its error check.
    """
    u = torch.rand(batch, 7, generator=generator, device=device)
    moved = u[:, 6] < settings.affine_prob
    angle = torch.deg2rad(_uniform(u[:, 0], settings.rotation)) * moved
    shear = torch.tan(torch.deg2rad(_uniform(u[:, 1], settings.shear))) * moved
    scale = torch.where(moved, _uniform(u[:, 2], settings.scale), torch.ones_like(angle))
    shift_x = settings.translate * (2 * u[:, 3] - 1) * moved
    shift_y = settings.translate * (2 * u[:, 4] - 1) * moved
    flip_x = torch.where(torch.rand(batch, generator=generator, device=device) < settings.hflip, -1.0, 1.0)
    flip_y = torch.where(torch.rand(batch, generator=generator, device=device) < settings.vflip, -1.0, 1.0)

    # Forward A = R(angle) · Shear_x · scale · Flip in y-down pixel coordinates;
    # R = [[cos, sin], [-sin, cos]] turns counter-clockwise as the image is displayed.
    cos, sin = torch.cos(angle), torch.sin(angle)
    a = scale * cos * flip_x
    b = scale * (cos * shear + sin) * flip_y
    c = -scale * sin * flip_x
    d = scale * (cos - sin * shear) * flip_y
    det = a * d - b * c
    # Inverse in pixel units, then into affine_grid's [-1, 1] units: D⁻¹ A⁻¹ D with D = diag(W/2, H/2).
    aspect = height / width
    inv = torch.stack(
        [torch.stack([d / det, -b / det * aspect], -1), torch.stack([-c / det / aspect, a / det], -1)], -2
    )
    # The forward shift is a fraction of the side; in normalised units a full side spans 2.
    shift = torch.stack([2 * shift_x, 2 * shift_y], -1).unsqueeze(-1)
    return torch.cat([inv, -inv @ shift], -1)


def sampling_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``F.affine_grid(theta, ..., align_corners=False)`` as two broadcast multiply-adds.

    affine_grid spends its time in a batched matmul with an inner size of 3,
    which is several times slower than this on the CPU for small images.
    """
    xs = (torch.arange(width, device=theta.device, dtype=theta.dtype) * 2 + 1) / width - 1
    ys = ((torch.arange(height, device=theta.device, dtype=theta.dtype) * 2 + 1) / height - 1)[:, None]
    t = theta.transpose(1, 2)[:, None, None]  # (B, 1, 1, 3, 2): columns for x, y and the shift
    along_x = xs[:, None] * t[..., 0, :] + t[..., 2, :]  # (B, 1, W, 2)
    along_y = ys[..., None] * t[..., 1, :]  # (B, H, 1, 2)
    return along_x + along_y  # (B, H, W, 2), written once


def _affine(x: torch.Tensor, settings: ImageAugment, generator: torch.Generator) -> torch.Tensor:
    batch, _, height, width = x.shape
    theta = affine_theta(settings, batch, height, width, generator, x.device).to(x.dtype)
    grid = sampling_grid(theta, height, width)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=settings.padding, align_corners=False)


def _brightness_contrast(x: torch.Tensor, settings: ImageAugment, generator: torch.Generator, span: torch.Tensor) -> torch.Tensor:
    u = torch.rand(x.shape[0], 2, 1, 1, 1, generator=generator, device=x.device, dtype=x.dtype)
    factor = 1 + settings.contrast * (2 * u[:, 0] - 1)
    offset = settings.brightness * (2 * u[:, 1] - 1) * span
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    # (x - mean) · factor + mean + offset, folded so the full-size work is one fused op.
    return torch.addcmul(mean * (1 - factor) + offset, x, factor)


def erase_mask(settings: ImageAugment, batch: int, height: int, width: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(B, 1, H, W) bool mask of the rectangles to erase, drawn for all samples and holes at once."""
    holes = settings.erase_holes
    u = torch.rand(batch, holes, 4, generator=generator, device=device)
    selected = torch.rand(batch, 1, generator=generator, device=device) < settings.erase_prob
    area = _uniform(u[..., 0], settings.erase_area) * (height * width)
    ratio = torch.exp(_uniform(u[..., 1], _ERASE_LOG_RATIO))
    h = torch.sqrt(area * ratio).round().clamp(1, height)
    w = torch.sqrt(area / ratio).round().clamp(1, width)
    top = torch.floor(u[..., 2] * (height - h + 1))
    left = torch.floor(u[..., 3] * (width - w + 1))
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_rows = (rows >= top[..., None]) & (rows < (top + h)[..., None])  # (B, K, H)
    in_cols = (cols >= left[..., None]) & (cols < (left + w)[..., None])  # (B, K, W)
    in_rows &= selected[..., None]  # unselected samples get no rows, so no holes
    holes_mask = in_rows[..., :, None] & in_cols[..., None, :]  # (B, K, H, W)
    return holes_mask.any(dim=1, keepdim=True) if holes > 1 else holes_mask


def augment_images(x: torch.Tensor, settings: ImageAugment, generator: torch.Generator) -> torch.Tensor:
    """Geometry → brightness/contrast → noise → erasing, for the whole batch; ``generator`` lives on x's device."""
    low, high = torch.aminmax(x)
    span = high - low  # a 0-dim tensor: stays on the device, no sync
    if settings.geometric():
        x = _affine(x, settings, generator)
    if settings.brightness > 0 or settings.contrast > 0:
        x = _brightness_contrast(x, settings, generator, span)
    if settings.noise_std > 0:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = torch.addcmul(x, noise, settings.noise_std * span)
    if settings.erase_prob > 0:
        mask = erase_mask(settings, x.shape[0], x.shape[2], x.shape[3], generator, x.device)
        x = x.masked_fill(mask, settings.erase_value)
    return x


__all__ = ["ImageAugment", "affine_theta", "augment_images", "erase_mask"]
