"""An uploaded image is preprocessed exactly as ingest stored the training images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.data.ingest import ingest
from pipelines.data.store import read_dataset
from pipelines.export.image_recipe import DIGITS, MNIST, image_recipe
from serving import ServingError
from serving.images import DIGITS_IMAGE, decode_image, image_spec
from tests.data.test_ingest_sources import make_folder


def _metadata(manifest: dict) -> dict:
    """The metadata.json fields image_spec reads, as the export step writes them."""
    return {
        "dataset": manifest["name"],
        "input_shape": manifest["input_shape"],
        "preprocessing": {"image": image_recipe(manifest)},
    }


@pytest.mark.parametrize("policy", ["resize", "pad", "crop"])
def test_uploading_a_training_file_gives_the_stored_training_tensor(
    project: Path, settings_for, tmp_path: Path, policy: str
) -> None:
    folder = make_folder(tmp_path / "pets", per_class=6)
    # The awkward cases: transparency, and a phone photo whose EXIF says "rotate me".
    rgba = np.zeros((18, 26, 4), dtype=np.uint8)
    rgba[..., 0], rgba[4:12, 5:20, 3] = 180, 255
    Image.fromarray(rgba, "RGBA").save(folder / "cat" / "transparent.png")
    photo = Image.fromarray(np.arange(24 * 32 * 3, dtype=np.uint8).reshape(24, 32, 3) % 251, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise
    photo.save(folder / "dog" / "rotated.jpg", exif=exif)

    ingest(project, settings_for(f"data.dataset={folder}", "data.image.size=[16,20]", f"data.image.resize={policy}").data)
    dataset = read_dataset(project / "data")
    spec = image_spec(_metadata(dataset.manifest))
    assert spec is not None and spec.fit == policy and spec.shape == (3, 16, 20)

    stored = {row.tobytes() for split in dataset.splits.values() for row in np.asarray(split.x)}
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".jpg"))
    for path in files:
        served = decode_image(path.read_bytes(), spec, path.name)
        assert served.dtype == np.float32 and served.shape == spec.shape
        assert np.array_equal(served, served.astype(np.uint8)), f"{path.name}: not the stored 8-bit values"
        assert served.astype(np.uint8).tobytes() in stored, f"{path.name}: the service sees another tensor than training"
    assert len(stored) == len(files)


def test_recipes_for_built_in_datasets_and_none_for_sequences() -> None:
    assert image_recipe({"kind": "image", "name": "digits", "input_shape": [1, 8, 8]}) == DIGITS
    from dataclasses import replace

    digits = image_spec(_metadata({"kind": "image", "name": "digits", "input_shape": [1, 8, 8]}))
    assert digits == replace(DIGITS_IMAGE, background=None)  # the upload check comes from upload_background
    assert image_recipe({"kind": "image", "name": "mnist", "input_shape": [1, 28, 28]}) == MNIST
    assert image_recipe({"kind": "sequence", "name": "mnist1d", "input_shape": [1, 40]}) is None
    # A user's folder named "digits" is still a folder: its own recipe, not scikit-learn's.
    folder = {"kind": "image", "name": "digits", "input_shape": [1, 8, 8], "preprocessing": {"resize": "pad"}}
    assert image_recipe(folder)["fit"] == "pad"


def test_a_broken_fit_policy_fails_the_server_start_not_each_upload() -> None:
    metadata = {"dataset": "pets", "input_shape": [1, 8, 8], "preprocessing": {"image": {**DIGITS, "fit": "squash"}}}
    with pytest.raises(ServingError, match="fit 'squash' must be one of resize, pad, crop"):
        image_spec(metadata)


# --- uploads of either polarity --------------------------------------------------------------


def _inverted_png(data: bytes) -> bytes:
    import io

    from PIL import ImageOps

    buffer = io.BytesIO()
    ImageOps.invert(Image.open(io.BytesIO(data)).convert("L")).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_white_on_black_upload_is_brought_to_the_training_polarity() -> None:
    from dataclasses import replace

    from tests.serving_fixtures import digit_png

    counts = np.random.default_rng(0).integers(0, 17, (8, 8))
    counts[0], counts[-1], counts[:, 0], counts[:, -1] = 0, 0, 0, 0  # a digit drawn inside its frame
    upload = digit_png(counts)  # black ink on white, as scikit-learn's digits were drawn
    np.testing.assert_allclose(decode_image(upload, DIGITS_IMAGE)[0], counts, atol=1e-4)
    # White on black, as MNIST files are: flipped back, the same tensor.
    np.testing.assert_allclose(decode_image(_inverted_png(upload), DIGITS_IMAGE)[0], counts, atol=1e-4)
    unchecked = replace(DIGITS_IMAGE, background=None)  # a model exported before upload_background
    assert np.abs(decode_image(_inverted_png(upload), unchecked)[0] - counts).max() > 10


def test_a_mid_grey_border_is_left_as_it_is() -> None:
    import io
    from dataclasses import replace

    grey = np.full((32, 32), 128, dtype=np.uint8)
    grey[8:24, 8:24] = 0
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    plain = replace(DIGITS_IMAGE, background=None)
    assert np.array_equal(decode_image(buffer.getvalue(), DIGITS_IMAGE), decode_image(buffer.getvalue(), plain))


def test_export_records_the_upload_background_of_built_in_datasets_only(project: Path, settings_for) -> None:
    from pipelines.export.image_recipe import upload_background

    for name, recipe in (("digits", DIGITS), ("mnist", MNIST)):
        ingest(project, settings_for(f"data.dataset={name}").data)
        train = read_dataset(project / "data").splits["train"].x
        assert upload_background(recipe, train) == "light", name  # dark ink on white uploads, ink-high arrays
    assert upload_background({**DIGITS, "invert": False}, train) == "dark"
    assert upload_background({**DIGITS, "fit": "pad"}, train) is None  # a user's folder: uploads as its files are
    assert upload_background(None, train) is None
    metadata = {"dataset": "digits", "input_shape": [1, 8, 8],
                "preprocessing": {"image": DIGITS, "upload_background": "sideways"}}
    with pytest.raises(ServingError, match="upload_background: 'sideways' must be"):
        image_spec(metadata)
