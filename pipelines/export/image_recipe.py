"""How the service should turn an uploaded image into this model's input (``preprocessing.image``).

Derived at export time from the dataset manifest, so existing data versions stay
valid; the recipes themselves are ``serving.images.ImageSpec`` values, defined once there.
"""

from __future__ import annotations

from typing import Any

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
