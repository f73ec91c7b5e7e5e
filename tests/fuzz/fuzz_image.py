"""Fuzz ``POST /predict/image``'s decoder: serving.images.decode_image with real recipes.

Each input is one uploaded file, sized from its header (serving/image_work.declared_pixels, the
route's first look) and decoded with the digits recipe (grey, box filter, inverted,
upload polarity checked) and with an RGB image-folder recipe (``fit: pad``). It passes when it
is refused with InvalidImage (400) or UnsupportedImage (415), or becomes a finite float32
array of the recipe's shape. The seeds are small PNG and JPEG files of the modes and EXIF
orientations uploads come in. Pillow is instrumented too, so the mutator is guided into its
chunk, marker and EXIF parsers, where hostile files go wrong.

    .venv/bin/python tests/fuzz/fuzz_image.py -max_total_time=60
"""

from __future__ import annotations

import io
import struct
import sys
import warnings
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import atheris
import numpy as np

with atheris.instrument_imports(include=["serving", "PIL"]):
    # Image.open imports its format plugins lazily, after this block: imported here, they are traced too.
    from PIL import (  # noqa: F401
        Image,
        ImageFile,
        ImageOps,
        JpegImagePlugin,
        MpoImagePlugin,
        PngImagePlugin,
        TiffImagePlugin,
    )

    from serving.image_work import declared_pixels
    from serving.images import DIGITS_IMAGE, ImageSpec, InvalidImage, decode_image

from tests.fuzz.harness import fuzz

FOLDER_IMAGE = ImageSpec(mode="RGB", height=6, width=5, resample="bilinear", fit="pad", low=-1.0, high=1.0)
RECIPES = (DIGITS_IMAGE, FOLDER_IMAGE)
ORIENTATION = 0x0112  # the EXIF tag exif_transpose reads
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def seeds() -> list[bytes]:
    """Small valid files in every mode a PNG or JPEG upload may have, some with an EXIF orientation."""
    rng = np.random.default_rng(0)
    files = []

    def save(image: Image.Image, fmt: str, **options: object) -> None:
        out = io.BytesIO()
        image.save(out, fmt, **options)
        files.append(out.getvalue())

    grey = Image.fromarray(rng.integers(0, 256, (9, 7), dtype=np.uint8))
    colour = Image.fromarray(rng.integers(0, 256, (5, 8, 3), dtype=np.uint8))
    for mode in ("1", "L", "LA", "P", "RGB", "RGBA"):
        save(colour.convert(mode), "PNG")
    save(grey.convert("I").convert("I;16"), "PNG")  # 16-bit grey
    save(colour.convert("P"), "PNG", transparency=3)
    for mode in ("L", "RGB", "CMYK"):
        save(colour.convert(mode), "JPEG", quality=50)
    save(colour, "JPEG", progressive=True)
    for orientation in (3, 6, 8):
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        save(grey, "JPEG", exif=exif.tobytes())
        save(colour, "PNG", exif=exif.tobytes())
    return files


TOKENS = [b"IHDR", b"IDAT", b"IEND", b"PLTE", b"tRNS", b"eXIf", b"iCCP", b"zTXt", b"iTXt", b"acTL", b"fcTL",
          b"\xff\xd8", b"\xff\xe1", b"Exif\x00\x00", b"MM\x00*", b"II*\x00", b"\x01\x12", b"\xff\xc0", b"\xff\xc2",
          b"\xff\xda", b"\xff\xd9", b"\x89PNG\r\n\x1a\n"]


def with_png_checksums(data: bytes) -> bytes:
    """``data`` with every whole PNG chunk's CRC recomputed; other bytes as they are.

    Pillow refuses a chunk whose CRC is wrong before reading it, so plain byte mutations of a PNG
    almost never reach the chunk parsers; a hostile client computes CRCs, so the fuzzer does too.
    """
    if not data.startswith(PNG_SIGNATURE):
        return data
    out = bytearray(data)
    at = len(PNG_SIGNATURE)
    while at + 12 <= len(out):
        (length,) = struct.unpack_from(">I", out, at)
        end = at + 8 + length
        if end + 4 > len(out):
            break
        struct.pack_into(">I", out, end, zlib.crc32(out[at + 4:end]))
        at = end + 4
    return bytes(out)


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    """libFuzzer's own mutation, then the PNG checksums made right (:func:`with_png_checksums`)."""
    return with_png_checksums(atheris.Mutate(data, max_size))


def test_one_input(data: bytes) -> None:
    """One uploaded file, as ImageWork.decode takes it: its size from the header, then through both recipes."""
    try:
        pixels = declared_pixels(data, "file 'x.png'")
    except InvalidImage as error:
        assert str(error).startswith("file 'x.png'"), error
        return
    assert pixels >= 0, pixels
    for spec in RECIPES:
        try:
            array = decode_image(data, spec, "file 'x.png'")
        except InvalidImage as error:
            assert str(error).startswith("file 'x.png'"), error  # the message names the file
            continue
        assert array.dtype == np.float32 and array.shape == spec.shape, (array.dtype, array.shape)
        assert np.isfinite(array).all(), array


if __name__ == "__main__":
    warnings.simplefilter("ignore")  # Pillow warns about every odd tag it skips; only exceptions count here
    fuzz("image", test_one_input, seeds(), TOKENS, max_len=8192, custom_mutator=mutate)
