"""Known input shifts, to check that a drift detector sees what it should (bench/drift.py, the tests).

Each takes a batch of raw inputs (as clients send them), a generator and the training
data's standard deviation, and returns the shifted batch in the same shape and dtype.
They imitate what changes in production: a camera that inverts or tilts, sensor noise,
a sensor re-calibrated to another scale or offset.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Shift = Callable[[np.ndarray, np.random.Generator, float], np.ndarray]


def inverted(x: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
    """Light-on-dark becomes dark-on-light (the value range of the batch kept)."""
    return (x.max() + x.min() - x).astype(x.dtype)


def rotated(degrees: float) -> Shift:
    def shift(x: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
        from scipy.ndimage import rotate

        return rotate(x, degrees, axes=(-2, -1), reshape=False, order=1, mode="constant", cval=float(x.min()))
    shift.__doc__ = f"Every image tilted by {degrees} degrees."
    return shift


def noised(scale: float) -> Shift:
    def shift(x: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
        noisy = x + rng.normal(0.0, scale * std, size=x.shape)
        return np.clip(noisy, x.min(), x.max()).astype(x.dtype) if x.min() >= 0 else noisy.astype(x.dtype)
    shift.__doc__ = f"Gaussian noise of {scale} training standard deviations."
    return shift


def scaled(factor: float) -> Shift:
    def shift(x: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
        return (x * factor).astype(x.dtype)
    shift.__doc__ = f"Every value multiplied by {factor}."
    return shift


def offset(amount: float) -> Shift:
    def shift(x: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
        return (x + amount * std).astype(x.dtype)
    shift.__doc__ = f"Every value moved by {amount} training standard deviations."
    return shift


IMAGE_SHIFTS: dict[str, Shift] = {"inverted": inverted, "rotated-30": rotated(30), "rotated-15": rotated(15),
                                  "noise-0.5": noised(0.5)}
SEQUENCE_SHIFTS: dict[str, Shift] = {"scaled-1.5": scaled(1.5), "scaled-1.2": scaled(1.2), "offset-0.5": offset(0.5),
                                     "noise-0.5": noised(0.5)}
