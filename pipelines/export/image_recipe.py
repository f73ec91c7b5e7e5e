"""How the service should turn an uploaded image into this model's input (``preprocessing.image``).

Derived at export time from the dataset manifest, so existing data versions stay
valid; the fields are the contract documented in ``serving/images.py``.
"""

from __future__ import annotations

from typing import Any

# scikit-learn's digits: ink counted in 4x4 blocks of a 32x32 black-on-white bitmap, 0..16.
DIGITS = {"mode": "L", "height": 8, "width": 8, "resample": "box", "invert": True, "range": [0.0, 16.0]}
# MNIST stores ink as 255 on a black background; uploads are dark ink on a light background.
MNIST = {"mode": "L", "height": 28, "width": 28, "resample": "bilinear", "invert": True, "range": [0.0, 255.0]}


def image_recipe(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The upload recipe for an image dataset's model, or None when uploads make no sense (sequences)."""
    if manifest.get("kind") != "image":
        return None
    preprocessing = manifest.get("preprocessing") or {}
    if "resize" in preprocessing:  # a user's image folder, stored as 8-bit pixels by serving.images.fit_pixels
        channels, height, width = manifest["input_shape"]
        return {
            "mode": "L" if channels == 1 else "RGB",
            "height": height,
            "width": width,
            "resample": "bilinear",
            "invert": False,
            "range": [0.0, 255.0],
            "fit": preprocessing["resize"],
        }
    return {"digits": DIGITS, "mnist": MNIST}.get(str(manifest.get("name")))
