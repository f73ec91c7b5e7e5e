"""Every input a fuzz target of tests/fuzz/ found, kept: each was a 500 before its fix.

The inputs are rebuilt here from a small valid file with the fuzzer's change made by hand
(the change is what matters, and it reads), and each is also kept as the fuzzer wrote it.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from serving import v2 as oip
from serving.http import json_response, parse_json
from serving.images import DIGITS_IMAGE, ImageSpec, InvalidImage, decode_image
from serving.schemas import InvalidInstances

FOLDER_IMAGE = ImageSpec(mode="RGB", height=6, width=5, fit="pad")  # fit: the recipe that copies twice
ORIENTATION = 0x0112


@pytest.mark.parametrize("value", [2**63, 2**64 + 1, -(2**63) - 1, 10**400])
def test_a_lengths_value_past_int64_is_refused_naming_it(value: int) -> None:
    """fuzz_v2: numpy's int64 conversion raised OverflowError (a 500) for a length >= 2**63."""
    tensor = {"name": "lengths", "datatype": "INT64", "shape": [2], "data": [3, value]}
    with pytest.raises(InvalidInstances, match=rf"inputs\[1\]\.data\[1\] is {value}; a length lies in 1\.\.4"):
        oip.lengths_values(tensor, 2, 4)


def test_lengths_in_range_still_come_back_as_int64() -> None:
    steps = oip.lengths_values({"datatype": "INT32", "shape": [2], "data": [4, 1]}, 2, 4)
    assert steps.dtype == np.int64 and steps.tolist() == [4, 1]


# What fuzz_v2 wrote (its second seed, with the id changed): a whole, valid request but for the id.
FOUND_ID = (b'{"id": "\\ud800a", "inputs": [{"name": "input", "shape": [2, 2, 4],"datatype": "FP32", "data": '
            b'[[[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 3, 4], [5, 6,7, 8]]]}, {"name": "lengths", "shape": [2], '
            b'"datatype": "INT64","data": [4, 1]}], "outputs": [{"name": "label"}]}')


@pytest.mark.parametrize("raw", [b'{"id": "\\udfff", "inputs": [{"name": "input"}]}', FOUND_ID], ids=["rebuilt", "found"])
def test_an_id_with_a_lone_surrogate_escape_is_refused_not_echoed(raw: bytes) -> None:
    """fuzz_v2: json.loads (parse_json's fallback) reads "\\ud800" into a str orjson cannot write, so
    the answer that echoes the id failed with TypeError (a 500) after the model had run."""
    with pytest.raises(InvalidInstances, match=r"^id holds a lone UTF-16 surrogate escape"):
        oip.parse_request(parse_json(raw))


@pytest.mark.parametrize("request_id", ["\u00e9t\u00e9", "\U0001f600", "x" * 300])
def test_an_id_of_valid_unicode_is_echoed(request_id: str) -> None:
    """Escapes of real characters, surrogate pairs included, stay accepted and come back as sent."""
    body = parse_json(json.dumps({"id": request_id, "inputs": [{"name": "input"}]}).encode())  # ASCII escapes
    _, _, echoed, outputs = oip.parse_request(body)
    answer = json_response(oip.infer_response("m", "1", echoed, outputs, np.full((1, 2), 0.5, np.float32), ["a", "b"]))
    assert json.loads(answer.body)["id"] == request_id


def _grey(fmt: str, **options: object) -> bytes:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 7), dtype=np.uint8))
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif.tobytes()


# What fuzz_image wrote: a JPEG whose EXIF block starts one byte late (";MM\0*..."). Pillow's JPEG
# reader skips such a block, but every copy of the image (convert, resize) parsed it again and raised.
FOUND_JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQAAAQABAAD/4QAiRXhpZgAAO01NACoAAAAIAAEBEgADAAAAAQAGAAAAAAAA/9sAQwAIBgYHBgUIBwcHCQkICgwU"
    "DQwLCwwZEhMPFB0aHx4dGhwcICQuJyAiLCMcHCg3KSwwMTQ0NB8nOT04MjwuMzQy/8AACwgACQAHAQERAP/EAB8AAAEFAQEBAQEBAAAA"
    "AAAAAAABAgMEBQYHCAkKC//EALUQAAIBAwMCBAMFBQQEAAABfQECAwAEEQUSITFBBhNRYQcicRQygZGhCCNCscEVvlLR8CQzYnKCCQoW"
    "FxgZGiUmJygpKjQ1Njc4OTpDREVGR0hJSlNUVVZXWFlaY2RlZmdoaWpzdHV2d3h5eoOEhYaHiImKkpOUlZaXmJmaoqOkpaanqKmqsrO0"
    "tba3uLm6wsPExcbHyMnK0tPU1dbX2Nna4eLj5OXm5+jp6vHy8/T19vf4+fr/2gAIAQEAAD8AZBd61HpMmj3ltbyWqmN1SeBXllR9zlWg"
    "dlRiGEbAKwKDgbgDWnpX+p8K/wDXW4/9Joq//9k="
)


@pytest.mark.parametrize("spec", [DIGITS_IMAGE, FOLDER_IMAGE], ids=["digits", "folder"])
@pytest.mark.parametrize("source", ["rebuilt", "found"])
def test_a_jpeg_with_an_unreadable_exif_block_decodes_as_its_pixels(spec: ImageSpec, source: str) -> None:
    """The unreadable block is ignored, as Pillow's JPEG reader ignores it: the pixels decode as without EXIF."""
    shifted = _grey("JPEG", exif=_exif(6)).replace(b"Exif\x00\x00MM\x00*\x00\x00\x00\x08",
                                                   b"Exif\x00\x00;MM\x00*\x00\x00\x00")
    data = shifted if source == "rebuilt" else FOUND_JPEG
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's note about the block it skipped
        got = decode_image(data, spec)
    if source == "rebuilt":
        np.testing.assert_array_equal(got, decode_image(_grey("JPEG"), spec))
    assert got.shape == spec.shape and np.isfinite(got).all()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@pytest.mark.parametrize("spec", [DIGITS_IMAGE, FOLDER_IMAGE], ids=["digits", "folder"])
def test_a_png_with_a_malformed_exif_chunk_is_a_400_naming_the_file(spec: ImageSpec) -> None:
    """Its parser raised SyntaxError from the orientation step, past the decoder's checks."""
    png = _grey("PNG")
    data = png[:-12] + _chunk(b"eXIf", b";MM\x00*\x00\x00\x00\x08\x00\x00") + png[-12:]  # before IEND
    with pytest.raises(InvalidImage, match=r"^file 'a\.png': corrupt PNG data \(not a TIFF file"):
        decode_image(data, spec, "file 'a.png'")


@pytest.mark.parametrize("spec", [DIGITS_IMAGE, FOLDER_IMAGE], ids=["digits", "folder"])
def test_a_readable_exif_orientation_is_still_applied(spec: ImageSpec) -> None:
    """The fix reads the orientation earlier (where a bad block is the client's error), not less."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 7), dtype=np.uint8))
    plain, turned = io.BytesIO(), io.BytesIO()
    image.transpose(Image.Transpose.ROTATE_270).save(plain, "PNG")
    image.save(turned, "PNG", exif=_exif(6))  # 6: shown rotated 270 degrees
    np.testing.assert_array_equal(decode_image(turned.getvalue(), spec), decode_image(plain.getvalue(), spec))
