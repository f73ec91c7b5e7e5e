"""Uploaded PNG/JPEG files → model input, the way the training data was made.

The recipe lives in ``metadata.json`` under ``preprocessing.image`` so that the
pipeline that builds training images and the service that reads uploads follow
one description::

    "image": {"mode": "L", "height": 8, "width": 8, "resample": "box",
              "invert": true, "range": [0.0, 16.0]}

A recipe with ``"fit"`` ("resize", "pad" or "crop") describes a user's image
folder: there the pixels are brought to size as 8-bit values by
:func:`fit_pixels`, the very function the ingest step stores training images
with, and only then mapped onto ``range``, so an upload of a training file gives
the training tensor bit for bit.

Pixels are read as 0..255 (transparent areas composited onto white), resized in
floating point, divided by 255, inverted when the dataset stores ink as high
values, and mapped linearly onto ``range``; the channels come first, as in the
ONNX input. :func:`image_to_array` is a pure function, importable by the data
pipeline to build training images with exactly the same steps.

scikit-learn's digits were made by counting ink pixels in 4x4 blocks of 32x32
black-on-white bitmaps, 0..16 per block: :data:`DIGITS_IMAGE` (a box filter over
inverted pixels, scaled to 16) reproduces that exactly for such a bitmap, and is
used for digits models whose metadata predates the ``image`` field.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving import ServingError

FORMATS = frozenset({"PNG", "JPEG"})
MAX_PIXELS = 4096 * 4096
_RESAMPLE = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")
FIT_POLICIES = ("resize", "pad", "crop")


class InvalidImage(ServingError, ValueError):
    """An upload that is not a readable PNG/JPEG within the limits; the service answers 400."""


class UnsupportedImage(InvalidImage):
    """A readable image in a format the service does not take (GIF, BMP...); answered with 415."""


@dataclass(frozen=True)
class ImageSpec:
    """How one image becomes one model input of shape (channels, height, width)."""

    mode: str
    height: int
    width: int
    resample: str = "bilinear"
    invert: bool = False
    low: float = 0.0
    high: float = 1.0
    fit: str | None = None  # image folders: "resize", "pad" or "crop" on 8-bit pixels (fit_pixels)
    background: str | None = None
    """"light" or "dark": the background uploads are expected on (metadata's ``preprocessing.upload_background``);
    an upload whose border says the other polarity is flipped first. Not in :meth:`as_dict`, which is the
    input contract: the tensors a correct upload becomes do not change."""

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "height": self.height,
            "width": self.width,
            "resample": self.resample,
            "invert": self.invert,
            "range": [self.low, self.high],
            **({"fit": self.fit} if self.fit else {}),
        }


# scikit-learn's digits: ink counted in 4x4 blocks of a 32x32 black-on-white bitmap, 0..16.
DIGITS_IMAGE = ImageSpec(mode="L", height=8, width=8, resample="box", invert=True, low=0.0, high=16.0,
                         background="light")
# MNIST stores ink as 255 on a black background; uploads are dark ink on a light background.
MNIST_IMAGE = ImageSpec(mode="L", height=28, width=28, resample="bilinear", invert=True, low=0.0, high=255.0,
                        background="light")
# Recipes of the built-in image datasets, by manifest name.
BUILTIN_IMAGE_RECIPES = {"digits": DIGITS_IMAGE, "mnist": MNIST_IMAGE}


def image_spec(metadata: Mapping[str, Any]) -> ImageSpec | None:
    """The image recipe of a model, or None when it takes no images.

    Raises ServingError when metadata.json carries a recipe that cannot work:
    a broken recipe must fail the server start, not every upload.
    """
    shape = tuple(metadata.get("input_shape") or ())
    raw = (metadata.get("preprocessing") or {}).get("image")
    if raw is None:
        if metadata.get("dataset") == "digits" and shape == DIGITS_IMAGE.shape:
            return DIGITS_IMAGE
        return None
    where = "metadata.json preprocessing.image"
    try:
        low, high = (float(v) for v in raw.get("range", (0.0, 1.0)))
        spec = ImageSpec(
            mode=str(raw["mode"]),
            height=int(raw["height"]),
            width=int(raw["width"]),
            resample=str(raw.get("resample", "bilinear")),
            invert=bool(raw.get("invert", False)),
            low=low,
            high=high,
            fit=None if raw.get("fit") is None else str(raw["fit"]),
            background=(metadata.get("preprocessing") or {}).get("upload_background"),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ServingError(f"{where}: {raw!r} is not a valid recipe ({error}); re-run the export step") from error
    if spec.background not in (None, "light", "dark"):
        raise ServingError(f"metadata.json preprocessing.upload_background: {spec.background!r} must be "
                           "'light', 'dark' or null")
    if spec.mode not in ("L", "RGB"):
        raise ServingError(f"{where}: mode {spec.mode!r} must be 'L' or 'RGB'")
    if spec.resample not in _RESAMPLE:
        raise ServingError(f"{where}: resample {spec.resample!r} must be one of {', '.join(_RESAMPLE)}")
    if spec.fit is not None and spec.fit not in FIT_POLICIES:
        raise ServingError(f"{where}: fit {spec.fit!r} must be one of {', '.join(FIT_POLICIES)}")
    if spec.shape != shape:
        raise ServingError(f"{where}: makes inputs of shape {spec.shape}, the model takes {shape}")
    return spec


# Where Pillow finds an upload's orientation (ImageOps.exif_transpose); nothing else in them is used.
_ORIENTATION = 0x0112  # the EXIF orientation tag
_ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def open_upload(data: bytes, name: str) -> Any:
    """An uploaded file opened from its header alone (Pillow decodes nothing until ``load()``):
    a PNG or JPEG within :data:`MAX_PIXELS`, else InvalidImage naming the file. Its ``size`` is what
    the request's pixel budget counts (serving/image_work.py) before anything is decoded."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InvalidImage(f"{name}: the file is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidImage(f"{name}: not a PNG or JPEG image (the file could not be identified)") from None
    except Exception as error:  # noqa: BLE001 - PIL raises many types for hostile input
        raise InvalidImage(f"{name}: not a readable PNG or JPEG image ({error})") from None
    if image.format not in FORMATS:
        raise UnsupportedImage(f"{name}: {image.format} images are not accepted; send PNG or JPEG")
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise InvalidImage(f"{name}: {width}x{height} pixels is more than the limit of {MAX_PIXELS} pixels")
    return image


def _load(image: Any, name: str) -> Any:
    """Decode an opened upload; corrupt data, and a malformed EXIF block, are the client's mistake."""
    from PIL import ImageOps

    try:
        image.load()  # decoding happens here: truncated or corrupt data fails now
        # EXIF is parsed lazily, by the orientation step: a malformed block must fail here too, as the
        # client's mistake, not later as a 500. Upright in place, so _upright_opaque finds nothing to turn.
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as error:  # noqa: BLE001
        raise InvalidImage(f"{name}: corrupt {image.format} data ({error})") from None
    for key in _ORIENTATION_SOURCES:  # done with: every copy (convert, resize) would parse them again, and
        image.info.pop(key, None)  # a JPEG's EXIF that Pillow's JPEG reader skipped over fails a copy's parser
    return image


def _upright_opaque(image: Any, mode: str) -> Any:
    """Apply the EXIF orientation, composite transparency onto white, convert to ``mode``."""
    from PIL import Image, ImageOps

    if image.getexif().get(_ORIENTATION, 1) != 1:  # exif_transpose copies even when nothing turns
        image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image if image.mode == mode else image.convert(mode)  # callers never change it in place


def fit_pixels(image: Any, mode: str, size: tuple[int, int], policy: str) -> np.ndarray:
    """A PIL image → uint8 array (channels, height, width) of ``size`` = (height, width).

    ``policy`` is "resize" (stretch), "pad" (keep the aspect ratio, pad with
    black) or "crop" (keep the aspect ratio, centre crop), all bilinear on 8-bit
    pixels. The ingest step stores image folders with this function and the
    service decodes uploads for such models with it, so the two cannot drift.
    """
    from PIL import Image, ImageOps

    if policy not in FIT_POLICIES:
        raise ValueError(f"fit policy {policy!r} must be one of {', '.join(FIT_POLICIES)}")
    image = _upright_opaque(image, mode)
    height, width = size
    if policy == "resize":
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    elif policy == "crop":
        image = ImageOps.fit(image, (width, height), Image.Resampling.BILINEAR)
    else:
        image = ImageOps.pad(image, (width, height), Image.Resampling.BILINEAR, color=0)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _to_range(values: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """0..255 values → ``spec.range``, inverted first when the dataset stores ink as high values.

    One multiply by (high − low) / 255: for a (0, 255) range that factor is exactly
    1, so 8-bit pixels come through unchanged, as the training data stored them.
    """
    if spec.invert:
        values = np.float32(255.0) - values
    scale = np.float32((spec.high - spec.low) / 255.0)
    return (np.float32(spec.low) + values * scale).astype(np.float32)


# An upload's border is "light" above this share of white, "dark" below the other one; between, it is left
# alone. A drawing or scan is mostly background, so a flipped one sits near 0 or 1: an ink-heavy border (a
# digit touching its frame) stays near the middle and is never mistaken for the other polarity.
_LIGHT, _DARK = 0.75, 0.25


def border_brightness(pixels: np.ndarray) -> float | None:
    """Mean of the outermost ring of pixels (height, width[, channels]) as a share of 255; None under 3x3."""
    if pixels.shape[0] < 3 or pixels.shape[1] < 3:
        return None
    # The whole minus the inside: two sums instead of gathering the ring (integers, so exact in float64).
    whole, inside = pixels.sum(dtype=np.float64), pixels[1:-1, 1:-1].sum(dtype=np.float64)
    count = pixels.size - pixels[1:-1, 1:-1].size
    return float((whole - inside) / count) / 255.0


def flipped_polarity(image: Any, spec: ImageSpec) -> bool:
    """True when an upright, opaque ``spec.mode`` image is drawn on the other background than ``spec.background``.

    A photo or scan of a digit is mostly background, so its border says which polarity it
    has: white ink on black (as MNIST files are) for a recipe that expects dark ink on white.
    """
    return spec.background is not None and _flipped(np.asarray(image), spec)


def _flipped(pixels: np.ndarray, spec: ImageSpec) -> bool:
    brightness = border_brightness(pixels)
    if brightness is None:
        return False
    return brightness < _DARK if spec.background == "light" else brightness > _LIGHT


def to_training_polarity(image: Any, spec: ImageSpec) -> Any:
    """The upright, opaque image with its polarity brought to the training images' (flipped when needed)."""
    if not flipped_polarity(image, spec):
        return image
    from PIL import ImageOps

    return ImageOps.invert(image)


def image_to_array(image: Any, spec: ImageSpec) -> np.ndarray:
    """A decoded PIL image → float32 array of ``spec.shape``, values mapped onto ``spec.range``.

    An upload of the other polarity than the training images is flipped first (see
    :func:`flipped_polarity`); a model exported without ``upload_background`` is not checked.
    """
    from PIL import Image

    image = _upright_opaque(image, spec.mode)
    if spec.fit is not None:
        pixels = fit_pixels(to_training_polarity(image, spec), spec.mode, (spec.height, spec.width), spec.fit)
        return _to_range(pixels.astype(np.float32), spec)
    # The pixels are read out of Pillow once (each read is a copy, and was a third of a digit's decode):
    # the border check and the flip (255 - v, exactly ImageOps.invert) work on that one array.
    raw = np.asarray(image)
    if spec.background is not None and _flipped(raw, spec):
        raw = np.uint8(255) - raw
    pixels = raw.astype(np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    resample = getattr(Image.Resampling, spec.resample.upper())
    channels = []
    for c in range(pixels.shape[2]):
        plane = Image.fromarray(np.ascontiguousarray(pixels[:, :, c]))  # float32 → mode "F"
        if plane.size != (spec.width, spec.height):
            plane = plane.resize((spec.width, spec.height), resample)
        channels.append(np.asarray(plane, dtype=np.float32))
    return _to_range(np.stack(channels), spec)


def decode_image(data: bytes, spec: ImageSpec, name: str = "image") -> np.ndarray:
    """Bytes of one uploaded file → one model input; InvalidImage names the file and the problem."""
    return decode_opened(open_upload(data, name), spec, name)


def decode_opened(image: Any, spec: ImageSpec, name: str = "image") -> np.ndarray:
    """An upload :func:`open_upload` opened → one model input (the header is not read twice)."""
    return image_to_array(_load(image, name), spec)
