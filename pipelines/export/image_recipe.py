"""How the service should turn an uploaded image into this model's input (``preprocessing.image``).

Derived at export time from the dataset manifest, so existing data versions stay
valid; the recipes themselves are ``serving.images.ImageSpec`` values, defined once there.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.images import BUILTIN_IMAGE_RECIPES, ImageSpec

DIGITS = BUILTIN_IMAGE_RECIPES["digits"].as_dict()
MNIST = BUILTIN_IMAGE_RECIPES["mnist"].as_dict()


def image_recipe(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The upload recipe for an image dataset's model, or None when uploads make no sense (sequences)."""
    if manifest.get("kind") != "image":
        return None
    preprocessing = manifest.get("preprocessing") or {}
    if "resize" in preprocessing:  # a user's image folder, stored as 8-bit pixels by serving.images.fit_pixels
        channels, height, width = manifest["input_shape"]
        spec = ImageSpec(
            mode="L" if channels == 1 else "RGB", height=height, width=width, resample="bilinear",
            invert=False, low=0.0, high=255.0, fit=preprocessing["resize"],
        )
        return spec.as_dict()
    builtin = BUILTIN_IMAGE_RECIPES.get(str(manifest.get("name")))
    return builtin.as_dict() if builtin else None


def upload_background(recipe: dict[str, Any] | None, train_x: np.ndarray, sample: int = 2000) -> str | None:
    """The background an upload should have to become what training saw: "light", "dark", or None (no uploads).

    Measured on the training images' borders (the median over up to ``sample`` of them, as a
    share of the recipe's range), then read through the recipe: a recipe that inverts (MNIST
    and digits store ink as high values on 0) expects dark ink on a light upload. Only for the
    built-in datasets, whose uploads are drawings of another medium than the stored arrays: a
    user's image folder (a recipe with ``fit``) takes uploads as its files are, so an upload of
    any training file still gives its stored tensor, whatever its background.
    """
    if recipe is None or recipe.get("fit") is not None or len(train_x) == 0:
        return None
    x = np.asarray(train_x[:sample], dtype=np.float32)
    if x.ndim != 4 or x.shape[2] < 3 or x.shape[3] < 3:
        return None
    ring = np.concatenate([x[:, :, 0, :], x[:, :, -1, :], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], axis=2)
    low, high = (float(v) for v in recipe.get("range", (0.0, 1.0)))
    stored_light = float(np.median((ring.mean(axis=(1, 2)) - low) / ((high - low) or 1.0))) >= 0.5
    return "light" if stored_light != bool(recipe.get("invert")) else "dark"
