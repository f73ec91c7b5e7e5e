"""Batched augmentation: each op does what its setting says, on whole batches, deterministically."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from pipelines.data.augment import (
    AugmentSettings,
    Augmenter,
    augmentation_grid,
    build_augmenter,
    hard_targets,
)
from pipelines.errors import FluxoError

EVERYTHING_IMAGE = {
    "rotation": 15, "translate": 0.1, "scale": [0.9, 1.1], "shear": 10, "hflip": 0.5, "vflip": 0.5,
    "brightness": 0.1, "contrast": 0.2, "noise_std": 0.05, "erase_prob": 0.5, "erase_holes": 2,
}
EVERYTHING_SEQUENCE = {
    "shift": 4, "amplitude": [0.8, 1.2], "jitter_std": 0.03, "warp": 0.3, "mask_prob": 0.5, "mask_value": "mean",
}
MIX = {"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "prob": 1.0}


def augmenter(kind: str = "image", num_classes: int = 10, **sections: dict) -> Augmenter:
    built = build_augmenter(AugmentSettings.model_validate(sections), kind, num_classes)
    assert built is not None
    return built


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(batch: int = 16, size: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 1, size, size, generator=seeded(seed))


def labels(batch: int = 16, num_classes: int = 10) -> torch.Tensor:
    return torch.arange(batch) % num_classes


# --- building -------------------------------------------------------------


def test_nothing_enabled_builds_nothing():
    assert build_augmenter(AugmentSettings(), "image", 10) is None
    assert build_augmenter(AugmentSettings(), "sequence", 10) is None
    # Ops of the other kind do not count.
    assert build_augmenter(AugmentSettings(sequence={"shift": 3}), "image", 10) is None
    assert build_augmenter(AugmentSettings(image={"rotation": 10}), "sequence", 10) is None
    assert build_augmenter(AugmentSettings(mix={"mixup_alpha": 0.2, "prob": 0.0}), "image", 10) is None
    assert build_augmenter(AugmentSettings(mix={"mixup_alpha": 0.2}), "sequence", 10) is not None


def test_settings_read_numbers_as_symmetric_ranges_and_reject_bad_ones():
    settings = AugmentSettings.model_validate({"image": {"rotation": 15, "shear": [0, 5]}})
    assert settings.image.rotation == (-15.0, 15.0) and settings.image.shear == (0.0, 5.0)
    for bad in ({"scale": [1.2, 0.8]}, {"scale": [0, 1]}, {"erase_area": [0, 0.1]}, {"hflip": 1.5}, {"rotaton": 5}):
        with pytest.raises(ValidationError):
            AugmentSettings.model_validate({"image": bad})
    with pytest.raises(ValidationError):
        AugmentSettings.model_validate({"sequence": {"warp": 1.0}})
    assert all(field.description for field in AugmentSettings.model_fields["image"].annotation.model_fields.values())
    assert all(field.description for field in AugmentSettings.model_fields["sequence"].annotation.model_fields.values())


def test_user_mistakes_raise_fluxo_errors():
    with pytest.raises(FluxoError, match="unknown dataset kind"):
        build_augmenter(AugmentSettings(image={"rotation": 5}), "audio", 10)
    with pytest.raises(FluxoError, match=r"\(B, C, H, W\)"):
        augmenter(image={"rotation": 5})(torch.rand(4, 1, 10), labels(4))
    with pytest.raises(FluxoError, match="floating-point"):
        augmenter(image={"rotation": 5})(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), labels(4))


# --- images -----------------------------------------------------------------


def test_flips_are_off_by_default_so_digits_stay_unflipped():
    settings = AugmentSettings(image={"brightness": 0.0, "noise_std": 1e-6})
    assert settings.image.hflip == 0 and settings.image.vflip == 0
    x = images()
    out, _ = augmenter(image=settings.image.model_dump())(x, labels(), seeded())
    assert torch.allclose(out, x, atol=1e-4)
    assert not torch.allclose(out, x.flip(-1), atol=1e-2)


@pytest.mark.parametrize(("field", "dim"), [("hflip", -1), ("vflip", -2)])
def test_flip_with_probability_one_mirrors_every_sample(field, dim):
    x = images()
    out, _ = augmenter(image={field: 1.0})(x, labels(), seeded())
    torch.testing.assert_close(out, x.flip(dim), atol=1e-5, rtol=0)


def test_rotation_by_90_degrees_matches_rot90():
    x = images(size=15)
    out, _ = augmenter(image={"rotation": [90, 90], "affine_prob": 1.0})(x, labels(), seeded())
    torch.testing.assert_close(out, torch.rot90(x, 1, dims=(2, 3)), atol=1e-4, rtol=0)


def test_affine_prob_zero_leaves_geometry_alone():
    x = images()
    out, _ = augmenter(image={"rotation": 30, "translate": 0.2, "affine_prob": 0.0, "noise_std": 1e-6})(x, labels(), seeded())
    torch.testing.assert_close(out, x, atol=1e-4, rtol=0)


def test_translation_moves_a_dot_by_at_most_the_fraction():
    x = torch.zeros(64, 1, 21, 21)
    x[:, :, 10, 10] = 1.0
    out, _ = augmenter(image={"translate": 0.2})(x, labels(64), seeded())
    weights = out[:, 0]
    rows = (weights.sum(2) * torch.arange(21.0)).sum(1) / weights.sum((1, 2))
    cols = (weights.sum(1) * torch.arange(21.0)).sum(1) / weights.sum((1, 2))
    shift = torch.stack([rows - 10, cols - 10])
    assert shift.abs().max() <= 0.2 * 21 + 1e-4
    assert shift.abs().amax(0).mean() > 1.0  # most samples actually moved
    torch.testing.assert_close(weights.sum((1, 2)), torch.ones(64), atol=1e-4, rtol=0)  # nothing left the frame


def test_scale_zooms_out_around_the_centre():
    x = torch.ones(8, 1, 20, 20)
    out, _ = augmenter(image={"scale": [0.5, 0.5]})(x, labels(8), seeded())
    assert abs(float(out.mean()) - 0.25) < 0.02
    assert float(out[:, :, 10, 10].min()) == pytest.approx(1.0)
    assert float(out[:, :, 0, 0].max()) == 0.0


def test_shear_slants_a_vertical_bar():
    x = torch.zeros(4, 1, 21, 21)
    x[:, :, :, 10] = 1.0
    out, _ = augmenter(image={"shear": [30, 30]})(x, labels(4), seeded())
    top, bottom = out[0, 0, 2].argmax(), out[0, 0, 18].argmax()
    assert top != bottom  # the bar now leans


def test_gaussian_noise_has_the_set_std_relative_to_the_value_range():
    x = images(batch=256, size=28) * 16  # digits-like range 0–16
    out, _ = augmenter(image={"noise_std": 0.05})(x, labels(256), seeded())
    expected = 0.05 * float(x.max() - x.min())
    assert float((out - x).std()) == pytest.approx(expected, rel=0.02)
    assert abs(float((out - x).mean())) < 0.01 * expected * 10


def test_brightness_shifts_each_sample_by_one_bounded_offset():
    x = images(batch=64)
    out, _ = augmenter(image={"brightness": 0.2})(x, labels(64), seeded())
    offset = (out - x).flatten(1)
    assert torch.allclose(offset, offset[:, :1].expand_as(offset), atol=1e-5)
    assert offset.abs().max() <= 0.2 * float(x.max() - x.min()) + 1e-5
    assert offset[:, 0].std() > 0.02


def test_contrast_keeps_the_mean_and_scales_the_spread():
    x = images(batch=64)
    out, _ = augmenter(image={"contrast": 0.3})(x, labels(64), seeded())
    torch.testing.assert_close(out.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-5, rtol=0)
    ratio = out.std((1, 2, 3)) / x.std((1, 2, 3))
    assert float(ratio.min()) >= 0.7 - 1e-4 and float(ratio.max()) <= 1.3 + 1e-4
    assert float(ratio.std()) > 0.05


def test_random_erasing_zeroes_the_expected_fraction():
    x = torch.ones(200, 1, 28, 28)
    out, _ = augmenter(image={"erase_prob": 1.0, "erase_area": [0.1, 0.1]})(x, labels(200), seeded())
    erased = (out == 0).float().mean((1, 2, 3))
    assert float((erased - 0.1).abs().max()) < 0.04  # integer box sides round the area
    assert float(erased.mean()) == pytest.approx(0.1, abs=0.01)

    half, _ = augmenter(image={"erase_prob": 0.5, "erase_area": [0.1, 0.1]})(x, labels(200), seeded())
    touched = float(((half == 0).flatten(1).any(1)).float().mean())
    assert 0.35 < touched < 0.65


def test_coarse_dropout_erases_several_holes():
    x = torch.ones(100, 1, 28, 28)
    one, _ = augmenter(image={"erase_prob": 1.0, "erase_area": [0.02, 0.02]})(x, labels(100), seeded())
    many, _ = augmenter(image={"erase_prob": 1.0, "erase_area": [0.02, 0.02], "erase_holes": 6})(x, labels(100), seeded())
    assert float((many == 0).float().mean()) > 3 * float((one == 0).float().mean())


# --- mixing -----------------------------------------------------------------


def class_coded(kind: str, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample is filled with its class number, so a blend's mean reveals its mix."""
    y = torch.arange(num_classes).repeat(4)
    shape = (len(y), 1, 12, 12) if kind == "image" else (len(y), 1, 40)
    return y.float().view(-1, *[1] * (len(shape) - 1)).expand(shape).clone(), y


@pytest.mark.parametrize("kind", ["image", "sequence"])
@pytest.mark.parametrize("method", ["mixup_alpha", "cutmix_alpha"])
def test_mixing_gives_convex_soft_targets_that_match_the_inputs(kind, method):
    x, y = class_coded(kind)
    mixer = augmenter(kind, mix={method: 1.0})
    for seed in range(5):
        out, targets = mixer(x, y, seeded(seed))
        assert targets.shape == (len(y), 10) and targets.dtype == torch.float32
        torch.testing.assert_close(targets.sum(1), torch.ones(len(y)))
        assert float(targets.min()) >= 0 and int((targets > 0).sum(1).max()) <= 2
        # The label is the same blend as the pixels: pixel mean = Σ share × class number.
        pixel_mean = out.flatten(1).mean(1)
        torch.testing.assert_close(pixel_mean, targets @ torch.arange(10.0), atol=1e-4, rtol=0)
        if method == "cutmix_alpha":  # pasted, not blended: every value is a class number
            assert torch.equal(out, out.round())


def test_mix_probability_leaves_some_batches_with_hard_targets():
    x, y = class_coded("image")
    mixer = augmenter(mix={"mixup_alpha": 0.4, "prob": 0.5})
    forms = [mixer(x, y, seeded(seed))[1].ndim for seed in range(40)]
    assert 5 < forms.count(2) < 35
    hard = next(seed for seed in range(40) if forms[seed] == 1)
    out, targets = mixer(x, y, seeded(hard))
    assert targets is y and torch.equal(out, x)


def test_cross_entropy_accepts_both_target_forms_and_hard_targets_recovers_classes():
    x, y = class_coded("image")
    logits = torch.randn(len(y), 10)
    for settings in ({"mixup_alpha": 0.4}, {"mixup_alpha": 0.4, "prob": 0.0}):
        built = build_augmenter(AugmentSettings(image={"noise_std": 0.01}, mix=settings), "image", 10)
        _, targets = built(x, y, seeded())
        assert torch.isfinite(F.cross_entropy(logits, targets))
        assert hard_targets(targets).shape == y.shape
    assert torch.equal(hard_targets(F.one_hot(y, 10).float()), y)


# --- sequences ----------------------------------------------------------------


def spikes(batch: int = 32, length: int = 40, at: int = 20) -> torch.Tensor:
    x = torch.zeros(batch, 1, length)
    x[:, :, at] = 1.0
    return x


def test_time_shift_moves_a_spike_within_the_limit():
    x = spikes()
    out, _ = augmenter("sequence", sequence={"shift": 5})(x, labels(32), seeded())
    moved = out[:, 0].argmax(1) - 20
    assert int(moved.abs().max()) <= 5 and len(moved.unique()) > 3
    torch.testing.assert_close(out.sum((1, 2)), x.sum((1, 2)))  # moved, not resampled


def test_time_shift_rolls_or_pads_at_the_ends():
    x = spikes(at=39)
    rolled, _ = augmenter("sequence", sequence={"shift": 5, "shift_mode": "roll"})(x, labels(32), seeded())
    padded, _ = augmenter("sequence", sequence={"shift": 5, "shift_mode": "pad"})(x, labels(32), seeded())
    assert torch.equal(rolled.sum((1, 2)), x.sum((1, 2)))  # wrapped round
    later = rolled[:, 0].argmax(1) < 5  # the spike went past the end
    assert bool(later.any()) and float(padded[later].abs().max()) == 0.0


def test_masking_zeroes_one_span():
    x = torch.ones(32, 2, 40)
    out, _ = augmenter("sequence", sequence={"mask_prob": 1.0, "mask_span": [0.25, 0.25]})(x, labels(32), seeded())
    zeros = out[:, 0] == 0
    assert torch.equal(zeros.sum(1), torch.full((32,), 10))
    assert torch.equal(zeros, out[:, 1] == 0)  # the same span on every channel
    first = zeros.float().argmax(1)
    span = torch.arange(40) - first[:, None]
    assert torch.equal(zeros, (span >= 0) & (span < 10))  # contiguous


def test_masking_with_the_mean_fills_the_span_with_it():
    x = torch.randn(16, 1, 40, generator=seeded())
    out, _ = augmenter("sequence", sequence={"mask_prob": 1.0, "mask_span": [0.2, 0.2], "mask_value": "mean"})(
        x, labels(16), seeded()
    )
    changed = out != x
    assert torch.allclose(out[changed].view(16, -1), x.mean(2).expand(16, 8), atol=1e-6)


def test_amplitude_scales_each_sample_by_one_factor_in_range():
    x = torch.randn(64, 2, 40, generator=seeded()) + 3
    out, _ = augmenter("sequence", sequence={"amplitude": [0.5, 1.5]})(x, labels(64), seeded())
    ratio = (out / x).flatten(1)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5)
    assert float(ratio.min()) >= 0.5 and float(ratio.max()) <= 1.5 and float(ratio[:, 0].std()) > 0.1


def test_jitter_has_the_set_std():
    x = torch.randn(256, 1, 40, generator=seeded())
    out, _ = augmenter("sequence", sequence={"jitter_std": 0.02})(x, labels(256), seeded())
    assert float((out - x).std()) == pytest.approx(0.02 * float(x.max() - x.min()), rel=0.03)


def test_time_warp_is_smooth_monotone_and_keeps_the_ends():
    ramp = torch.linspace(0, 1, 40).expand(32, 1, 40).clone()
    out, _ = augmenter("sequence", sequence={"warp": 0.5})(ramp, labels(32), seeded())
    steps = out.diff(dim=2)
    assert float(steps.min()) > 0  # still increasing: a monotone warp of time
    torch.testing.assert_close(out[..., [0, -1]], ramp[..., [0, -1]])
    assert float((out - ramp).abs().max()) > 0.01
    # Knot speeds lie in 1 ± warp before rescaling to the length, so fastest / slowest <= 1.5 / 0.5.
    assert float((steps.amax(2) / steps.amin(2)).max()) <= 3.0 + 1e-4


# --- variable-length sequences: ops stay inside each sample's valid steps -------------


def padded_ramps(batch: int = 32, length: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Increasing ramps 1..2 over each sample's own length, zero padding after it."""
    lengths = torch.randint(3, length + 1, (batch,), generator=seeded(seed))
    lengths[0], lengths[1] = length, 1  # the extremes
    steps = torch.arange(length)
    ramp = 1 + steps / (lengths[:, None] - 1).clamp(min=1)
    x = torch.where(steps < lengths[:, None], ramp, torch.zeros(())).unsqueeze(1).repeat(1, 2, 1)
    return x, lengths


def valid(lengths: torch.Tensor, length: int = 40) -> torch.Tensor:
    return (torch.arange(length) < lengths[:, None]).unsqueeze(1).expand(-1, 2, -1)


@pytest.mark.parametrize("ops", [
    {"shift": 6}, {"shift": 6, "shift_mode": "pad"}, {"warp": 0.5}, {"jitter_std": 0.05},
    {"mask_prob": 1.0, "mask_value": "mean"}, EVERYTHING_SEQUENCE,
])
def test_padding_stays_padding_and_no_padding_enters_the_signal(ops: dict):
    x, lengths = padded_ramps()
    out, _ = augmenter("sequence", sequence=ops)(x, labels(32), seeded(), lengths)
    inside = valid(lengths)
    assert float(out[~inside].abs().max()) == 0.0, "padding was changed"
    if "shift_mode" not in ops and "mask_prob" not in ops and ops is not EVERYTHING_SEQUENCE:
        # Ramps start at 1: a zero inside the valid steps could only be padding pulled in.
        assert float(out[inside].abs().min()) > 0.5, "padding was moved into the signal"


def test_rolling_a_variable_length_sequence_rotates_its_own_steps():
    x, lengths = padded_ramps()
    out, _ = augmenter("sequence", sequence={"shift": 6})(x, labels(32), seeded(), lengths)
    for b in range(32):
        n = int(lengths[b])
        rotated = [torch.roll(x[b, 0, :n], k) for k in range(-6, 7)]
        assert any(torch.equal(out[b, 0, :n], r) for r in rotated), f"sample {b} (length {n})"


def test_time_warp_keeps_each_samples_own_ends():
    x, lengths = padded_ramps()
    out, _ = augmenter("sequence", sequence={"warp": 0.5})(x, labels(32), seeded(), lengths)
    last = (lengths - 1).view(-1, 1, 1).expand(-1, 2, 1)
    torch.testing.assert_close(out[..., :1], x[..., :1])
    torch.testing.assert_close(out.gather(2, last), x.gather(2, last))
    long_enough = lengths >= 3
    assert float((out - x)[long_enough].abs().max()) > 0.01


def test_masks_fall_inside_the_valid_steps_and_fill_with_their_mean():
    x, lengths = padded_ramps()
    out, _ = augmenter("sequence", sequence={"mask_prob": 1.0, "mask_span": [0.5, 0.5], "mask_value": "mean"})(
        x, labels(32), seeded(), lengths
    )
    changed = out != x
    assert not bool((changed & ~valid(lengths)).any())
    means = x.sum(2, keepdim=True) / lengths.view(-1, 1, 1)
    torch.testing.assert_close(out[changed], means.expand_as(x)[changed])


def test_full_lengths_give_the_fixed_length_result_up_to_rounding():
    x = torch.randn(32, 2, 40, generator=seeded())
    full = torch.full((32,), 40)
    ops = augmenter("sequence", sequence=EVERYTHING_SEQUENCE, mix={})
    without, _ = ops(x, labels(32), seeded(3))
    with_lengths, _ = ops(x, labels(32), seeded(3), full)
    torch.testing.assert_close(with_lengths, without, rtol=1e-4, atol=5e-5)


# --- every op together ----------------------------------------------------------


def batch_of(kind: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    shape = (32, 1, 16, 16) if kind == "image" else (32, 2, 40)
    x = torch.randn(shape, generator=seeded()).to(device=device, dtype=dtype)
    return x, labels(32).to(device)


def everything(kind: str, mix: bool = True) -> Augmenter:
    return augmenter(kind, image=EVERYTHING_IMAGE, sequence=EVERYTHING_SEQUENCE, mix=MIX if mix else {})


@pytest.mark.parametrize("kind", ["image", "sequence"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_and_device_are_kept_and_nothing_is_nan(kind, dtype):
    x, y = batch_of(kind, dtype)
    out, targets = everything(kind, mix=False)(x, y, seeded())
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert torch.equal(targets, y) and targets.dtype == torch.int64
    assert torch.isfinite(out).all()
    mixed, soft = everything(kind)(x, y, seeded())
    assert mixed.dtype == dtype and soft.shape == (32, 10) and torch.isfinite(mixed).all()


@pytest.mark.parametrize("kind", ["image", "sequence"])
def test_constant_batches_stay_finite(kind):
    x, y = batch_of(kind)
    out, _ = everything(kind)(torch.zeros_like(x), y, seeded())
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["image", "sequence"])
def test_same_generator_state_gives_the_same_batch(kind):
    x, y = batch_of(kind)
    full = everything(kind)
    first, second, other = full(x, y, seeded(7)), full(x, y, seeded(7)), full(x, y, seeded(8))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])
    torch.manual_seed(3)
    a = full(x, y)
    torch.manual_seed(3)
    b = full(x, y)
    assert torch.equal(a[0], b[0])  # no generator: torch's default one, so torch.manual_seed rules


def test_a_generator_advances_so_successive_batches_differ():
    x, y = batch_of("image")
    generator = seeded()
    full = everything("image", mix=False)
    assert not torch.equal(full(x, y, generator)[0], full(x, y, generator)[0])


def test_works_under_no_grad_and_leaves_the_input_alone():
    x, y = batch_of("image")
    before = x.clone()
    with torch.no_grad():
        out, _ = everything("image")(x, y, seeded())
    assert torch.equal(x, before) and not out.requires_grad


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["image", "sequence"])
def test_runs_on_cuda_where_the_batch_lives(kind):
    x, y = batch_of(kind, device="cuda")
    out, targets = everything(kind)(x, y, seeded())
    assert out.device == x.device and targets.device == x.device and torch.isfinite(out).all()
    again, _ = everything(kind)(x, y, seeded())
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        everything(kind)(x, y, torch.Generator(device="cuda"))


# --- the picture ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["image", "sequence"])
def test_augmentation_grid_draws_originals_beside_augmented(kind):
    x, y = batch_of(kind)
    figure = augmentation_grid(everything(kind), x, y, n=12, generator=seeded())
    assert len(figure.axes) >= 2
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    assert buffer.getvalue().startswith(b"\x89PNG")
