"""Batched data augmentation for training: settings, the augmenter, and a picture of what it does.

Training data already sits on the device as whole tensors (see
``pipelines.train.engine``), so augmentation works on a whole batch there too:
per-sample random parameters are drawn as tensors and applied with a few
batched ops, never a Python loop over samples, never a host sync.

Randomness: the caller passes a CPU ``torch.Generator`` (the engine's), from
which one seed per call is drawn on the host. That seed seeds a generator on
the batch's device for all per-sample draws, and a host-side ``random.Random``
for the one per-batch decision that changes the output's type (mixup/cutmix
fired or not). Same generator state, same augmentation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pipelines.data.augment_image import ImageAugment, augment_images
from pipelines.data.augment_sequence import SequenceAugment, augment_sequences
from pipelines.errors import FluxoError
from pipelines.settings.augment import AugmentSettings, MixAugment  # noqa: F401 - re-exported

if TYPE_CHECKING:
    from matplotlib.figure import Figure

KINDS = ("image", "sequence")


@dataclass(frozen=True)
class Augmenter:
    """Augments whole training batches; build it with :func:`build_augmenter`."""

    kind: str
    settings: AugmentSettings
    num_classes: int

    def __call__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator | None = None,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x augmented, targets)`` on x's device.

        Targets are ``y`` unchanged (int64 class indices) unless mixup/CutMix
        fired for this batch; then they are soft float targets (B,
        num_classes), rows summing to 1. ``F.cross_entropy`` accepts both; take
        :func:`hard_targets` for accuracy. ``generator`` must be a CPU
        generator (None: torch's default one, so ``torch.manual_seed`` rules).
        ``lengths`` (variable-length sequences) keeps sequence ops within each
        sample's valid steps.
        """
        self._check(x, y)
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("augmenter: pass a CPU torch.Generator; per-sample draws happen on x's device from a seed it yields")
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        device_generator = torch.Generator(device=x.device).manual_seed(seed)
        with torch.no_grad():
            if self.kind == "image" and self.settings.image.enabled():
                x = augment_images(x, self.settings.image, device_generator)
            elif self.kind == "sequence" and self.settings.sequence.enabled():
                x = augment_sequences(x, self.settings.sequence, device_generator, lengths)
            if self.settings.mix.enabled():
                x, y = mix_batch(x, y, self.settings.mix, self.num_classes, random.Random(seed), device_generator)
        return x, y

    def _check(self, x: torch.Tensor, y: torch.Tensor) -> None:
        rank = 4 if self.kind == "image" else 3
        layout = "(B, C, H, W)" if self.kind == "image" else "(B, C, L)"
        if x.ndim != rank:
            raise FluxoError(
                f"augment: {self.kind} batches are {layout}, got shape {tuple(x.shape)}; "
                "check that the dataset kind matches the augment section in use"
            )
        if not x.is_floating_point():
            raise FluxoError(f"augment: expected a floating-point batch, got {x.dtype}; convert with to_device first")
        if y.shape[0] != x.shape[0]:
            raise FluxoError(f"augment: {x.shape[0]} inputs but {y.shape[0]} targets in the batch")


def build_augmenter(settings: AugmentSettings, kind: str, num_classes: int) -> Augmenter | None:
    """The augmenter for a dataset ``kind`` ("image" or "sequence"), or None when no op is enabled for it.

    A table takes none: its raw columns hold empty cells and category codes that neither a
    sequence op nor mixing two rows would leave meaningful.
    """
    if kind == "table":
        enabled = [name for name in ("image", "sequence", "mix") if getattr(settings, name).enabled()]
        if enabled:
            raise FluxoError(f"augment.{enabled[0]} is set, but a table takes no augmentation; remove the augment "
                             "section (or train on this file as sequences: --set data.sequence.kind=sequence)")
        return None
    if kind not in KINDS:
        raise FluxoError(f"augment: unknown dataset kind {kind!r}; expected one of {', '.join(KINDS)}, table")
    if num_classes < 1:
        raise FluxoError(f"augment: num_classes must be at least 1, got {num_classes}")
    ops = settings.image if kind == "image" else settings.sequence
    if not ops.enabled() and not settings.mix.enabled():
        return None
    return Augmenter(kind, settings, num_classes)


def hard_targets(targets: torch.Tensor) -> torch.Tensor:
    """Class indices from either target form: soft (B, K) → argmax, indices pass through."""
    return targets.argmax(dim=1) if targets.ndim == 2 else targets


def mix_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    settings: MixAugment,
    num_classes: int,
    rng: random.Random,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix of each sample with a random partner, one weight per batch.

    The per-batch decision and weight come from the host-side ``rng`` because
    they decide the output's form; the pairing is drawn on the device. CutMix
    pastes one box (a span for sequences) for the whole batch and sets the
    weight from the box's clipped area, so the label matches the pixels.
    """
    if rng.random() >= settings.prob:
        return x, y
    use_cutmix = settings.cutmix_alpha > 0 and (settings.mixup_alpha == 0 or rng.random() < 0.5)
    alpha = settings.cutmix_alpha if use_cutmix else settings.mixup_alpha
    weight = rng.betavariate(alpha, alpha)
    partner = torch.randperm(x.shape[0], generator=generator, device=x.device)
    if use_cutmix:
        region, kept = _cut_region(x.shape[2:], 1.0 - weight, rng)
        x = x.clone()
        x[region] = x[partner][region]
        weight = kept
    else:
        x = torch.lerp(x[partner], x, weight)
    soft = y.to(x.dtype) if y.ndim == 2 else F.one_hot(y, num_classes).to(x.dtype)
    return x, torch.lerp(soft[partner], soft, weight)


def _cut_region(spatial: torch.Size, area: float, rng: random.Random) -> tuple[tuple[slice, ...], float]:
    """A box covering about ``area`` of the spatial dims, centred anywhere, clipped; and the share left uncut."""
    side = area ** (1 / len(spatial))
    region: list[slice] = [slice(None), slice(None)]
    cut = 1.0
    for size in spatial:
        length = int(round(size * side))
        centre = rng.randrange(size)
        lo, hi = max(centre - length // 2, 0), min(centre + length - length // 2, size)
        region.append(slice(lo, hi))
        cut *= (hi - lo) / size
    return tuple(region), 1.0 - cut


def augmentation_grid(
    augmenter: Augmenter, x: torch.Tensor, y: torch.Tensor, n: int = 32, generator: torch.Generator | None = None
) -> Figure:
    """Originals beside their augmented versions, so a person sees what training saw.

    Images: two tiled panels (original | augmented), each tile labelled with
    its class (``a/b`` when mixing blended two). Sequences: one small plot per
    sample with the original in grey under the augmented line.
    """
    from matplotlib.figure import Figure  # imported here: matplotlib is slow to import and only plots need it

    x, y = x[:n], y[:n]
    augmented, targets = augmenter(x, y, generator)
    x, augmented = x.detach().float().cpu(), augmented.detach().float().cpu()
    names = [_target_name(row) for row in targets.detach().cpu()]
    if augmenter.kind == "image":
        return _image_grid(Figure, x, augmented, [str(int(v)) for v in y.cpu()], names)
    return _sequence_grid(Figure, x, augmented, names)


def _target_name(target: torch.Tensor) -> str:
    if target.ndim == 0:
        return str(int(target))
    top = torch.topk(target, min(2, target.numel()))
    shares = [(int(i), float(v)) for v, i in zip(top.values, top.indices) if float(v) > 0.01]
    return "/".join(f"{i}" for i, _ in shares) if len(shares) > 1 else str(shares[0][0])


def _tile(batch: torch.Tensor, columns: int) -> torch.Tensor:
    """(N, C, H, W) → one (H', W', C) image with a 1-pixel gap; each sample scaled to [0, 1] on its own."""
    count, channels, height, width = batch.shape
    batch = batch[:, :3] if channels >= 3 else batch[:, :1]
    flat = batch.reshape(count, -1)
    low, high = flat.min(1).values, flat.max(1).values
    batch = (batch - low[:, None, None, None]) / (high - low).clamp_min(1e-12)[:, None, None, None]
    rows = -(-count // columns)
    canvas = torch.ones(batch.shape[1], rows * (height + 1) + 1, columns * (width + 1) + 1)
    for k in range(count):
        r, c = divmod(k, columns)
        canvas[:, 1 + r * (height + 1) : 1 + r * (height + 1) + height, 1 + c * (width + 1) : 1 + c * (width + 1) + width] = batch[k]
    return canvas.permute(1, 2, 0)


def _image_grid(figure_cls: type, x: torch.Tensor, augmented: torch.Tensor, before: list[str], after: list[str]) -> Figure:
    columns = min(8, len(x))
    height, width = x.shape[2], x.shape[3]
    figure = figure_cls(figsize=(12, 0.8 + 0.75 * -(-len(x) // columns)), layout="constrained")
    for axis, batch, names, title in zip(
        figure.subplots(1, 2), (x, augmented), (before, after), ("original", "augmented (as trained on)")
    ):
        canvas = _tile(batch, columns)
        axis.imshow(canvas.squeeze(-1).numpy(), cmap="gray" if canvas.shape[-1] == 1 else None, vmin=0, vmax=1)
        for k, name in enumerate(names):
            r, c = divmod(k, columns)
            axis.text(2 + c * (width + 1), 1 + r * (height + 1), name, color="tab:orange", fontsize=7, va="top")
        axis.set_title(title)
        axis.set_axis_off()
    return figure


def _sequence_grid(figure_cls: type, x: torch.Tensor, augmented: torch.Tensor, names: list[str]) -> Figure:
    columns = min(8, len(x))
    rows = -(-len(x) // columns)
    figure = figure_cls(figsize=(2 * columns, 1.4 * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False, sharex=True)
    for k, axis in enumerate(axes.flat):
        if k >= len(x):
            axis.set_axis_off()
            continue
        for channel in range(x.shape[1]):
            axis.plot(x[k, channel].numpy(), color="0.75", linewidth=0.8)
            axis.plot(augmented[k, channel].numpy(), linewidth=0.9)
        axis.set_title(names[k], fontsize=8)
        axis.tick_params(labelsize=6)
    figure.suptitle("grey: original · colour: augmented (as trained on)")
    return figure


__all__ = [
    "AugmentSettings",
    "Augmenter",
    "ImageAugment",
    "MixAugment",
    "SequenceAugment",
    "augmentation_grid",
    "build_augmenter",
    "hard_targets",
    "mix_batch",
]
