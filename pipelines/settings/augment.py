"""Augmentation settings: which batch transforms run, and how strongly (the ops live in pipelines/data)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def symmetric_range(value: object) -> object:
    """Let a range setting be written as one number ``d`` meaning ``(-d, d)``, or as ``[lo, hi]``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (-abs(float(value)), abs(float(value)))
    return value


def check_range(pair: tuple[float, float], name: str) -> tuple[float, float]:
    if pair[0] > pair[1]:
        raise ValueError(f"{name}: lower bound {pair[0]} exceeds upper bound {pair[1]}; write [lo, hi]")
    return pair


class ImageAugment(BaseModel):
    """Per-op settings for (B, C, H, W) batches; every op is off by default."""

    model_config = ConfigDict(extra="forbid")

    rotation: tuple[float, float] = Field(
        (0.0, 0.0),
        description="Rotation in degrees, counter-clockwise as displayed; a number d means uniform in [-d, d].",
    )
    translate: float = Field(
        0.0, ge=0, le=1, description="Largest shift along each axis, as a fraction of the image width/height."
    )
    scale: tuple[float, float] = Field((1.0, 1.0), description="Zoom factor range [lo, hi]; 1 keeps the size.")
    shear: tuple[float, float] = Field(
        (0.0, 0.0), description="Horizontal shear angle in degrees; a number d means uniform in [-d, d]."
    )
    affine_prob: float = Field(
        1.0, ge=0, le=1, description="Probability that a sample gets the rotation/translation/scale/shear at all."
    )
    padding: Literal["zeros", "border", "reflection"] = Field(
        "zeros", description="What fills pixels moved in from outside the image (grid_sample padding_mode)."
    )
    hflip: float = Field(
        0.0, ge=0, le=1, description="Probability of a left-right flip. Keep 0 for digits and text: a flip changes the class."
    )
    vflip: float = Field(0.0, ge=0, le=1, description="Probability of an up-down flip. Keep 0 for digits and text.")
    brightness: float = Field(
        0.0, ge=0, description="Largest brightness offset, as a fraction of the batch's value range (uniform ±)."
    )
    contrast: float = Field(
        0.0, ge=0, le=1, description="Largest relative contrast change around each sample's mean (factor in 1 ± c)."
    )
    noise_std: float = Field(
        0.0, ge=0, description="Std of additive gaussian noise, as a fraction of the batch's value range."
    )
    erase_prob: float = Field(0.0, ge=0, le=1, description="Probability that a sample gets random erasing.")
    erase_area: tuple[float, float] = Field(
        (0.02, 0.2), description="Area of each erased rectangle as a fraction of the image, uniform in [lo, hi]."
    )
    erase_holes: int = Field(
        1, ge=1, le=64, description="Rectangles erased per selected sample (more than 1 gives coarse dropout)."
    )
    erase_value: float = Field(0.0, description="Value written into erased rectangles.")

    _symmetric = field_validator("rotation", "shear", mode="before")(symmetric_range)

    @model_validator(mode="after")
    def _ranges_ordered(self) -> "ImageAugment":
        check_range(self.rotation, "rotation")
        check_range(self.shear, "shear")
        check_range(self.scale, "scale")
        check_range(self.erase_area, "erase_area")
        if self.scale[0] <= 0:
            raise ValueError("scale: factors must be > 0, for example [0.9, 1.1]")
        if not 0 < self.erase_area[0] <= self.erase_area[1] <= 1:
            raise ValueError("erase_area: fractions must satisfy 0 < lo <= hi <= 1, for example [0.02, 0.2]")
        if max(abs(a) for a in self.shear) >= 90:
            raise ValueError("shear: angles must lie strictly between -90 and 90 degrees")
        return self

    def geometric(self) -> bool:
        """Whether any op needs the resampling pass (flips ride along in the same matrix)."""
        moves = self.rotation != (0.0, 0.0) or self.translate > 0 or self.scale != (1.0, 1.0) or self.shear != (0.0, 0.0)
        return (moves and self.affine_prob > 0) or self.hflip > 0 or self.vflip > 0

    def enabled(self) -> bool:
        return self.geometric() or self.brightness > 0 or self.contrast > 0 or self.noise_std > 0 or self.erase_prob > 0


class SequenceAugment(BaseModel):
    """Per-op settings for (B, C, L) batches; every op is off by default."""

    model_config = ConfigDict(extra="forbid")

    shift: int = Field(0, ge=0, description="Largest time shift in steps; each sample moves uniformly in [-shift, shift].")
    shift_mode: Literal["roll", "pad"] = Field(
        "roll", description="roll: steps pushed off one end come back at the other; pad: they are dropped and zeros fill in."
    )
    amplitude: tuple[float, float] = Field((1.0, 1.0), description="Amplitude scaling factor range [lo, hi]; 1 keeps it.")
    jitter_std: float = Field(
        0.0, ge=0, description="Std of additive gaussian jitter, as a fraction of the batch's value range."
    )
    warp: float = Field(
        0.0, ge=0, lt=1, description="Time-warp strength: smooth random playback speeds drawn in 1 ± warp, "
        "rescaled so the sequence keeps its length and both ends."
    )
    warp_knots: int = Field(4, ge=2, le=64, description="Random speed knots per sequence; fewer gives smoother warps.")
    mask_prob: float = Field(0.0, ge=0, le=1, description="Probability that a sample gets one span masked.")
    mask_span: tuple[float, float] = Field(
        (0.05, 0.2), description="Masked span length as a fraction of the sequence, uniform in [lo, hi]."
    )
    mask_value: Literal["zero", "mean"] = Field(
        "zero", description="What a masked span holds: 0, or each sample's per-channel mean."
    )

    @model_validator(mode="after")
    def _ranges_ordered(self) -> "SequenceAugment":
        check_range(self.amplitude, "amplitude")
        check_range(self.mask_span, "mask_span")
        if not 0 < self.mask_span[0] <= self.mask_span[1] <= 1:
            raise ValueError("mask_span: fractions must satisfy 0 < lo <= hi <= 1, for example [0.05, 0.2]")
        return self

    def enabled(self) -> bool:
        return (
            self.shift > 0 or self.amplitude != (1.0, 1.0) or self.jitter_std > 0 or self.warp > 0 or self.mask_prob > 0
        )


class MixAugment(BaseModel):
    """Mixup and CutMix: blend pairs of samples and their labels into soft targets."""

    model_config = ConfigDict(extra="forbid")

    mixup_alpha: float = Field(
        0.0, ge=0, description="Beta(α, α) concentration of the mixup weight; 0 turns mixup off, 0.2–0.4 is usual."
    )
    cutmix_alpha: float = Field(
        0.0, ge=0, description="Beta(α, α) concentration of the CutMix area; 0 turns CutMix off, 1.0 is usual."
    )
    prob: float = Field(
        1.0, ge=0, le=1, description="Probability that a batch is mixed; with both on, each mixed batch picks one at random."
    )

    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


class AugmentSettings(BaseModel):
    """Training-batch augmentation; everything is off by default, so runs change only when asked.

    ``image`` applies to image datasets, ``sequence`` to sequence datasets;
    ``mix`` to both.
    """

    model_config = ConfigDict(extra="forbid")

    image: ImageAugment = Field(default_factory=ImageAugment, description="Ops for (B, C, H, W) image batches.")
    sequence: SequenceAugment = Field(
        default_factory=SequenceAugment, description="Ops for (B, C, L) sequence batches."
    )
    mix: MixAugment = Field(default_factory=MixAugment, description="Mixup/CutMix, for either kind.")
