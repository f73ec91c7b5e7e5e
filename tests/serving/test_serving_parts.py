"""serving/ pieces without a server: the batcher, image decoding, the model pointer, v2 tensors."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving import ServingError
from serving.batching import Batcher
from serving.images import DIGITS_IMAGE, ImageSpec, InvalidImage, UnsupportedImage, decode_image, image_spec
from serving.reload import POINTER_FILE, PointerWatcher, publish, read_pointer, resolve_model_dir
from serving.schemas import InvalidInstances, TooManyInstances, validate_tensor
from tests.serving_fixtures import build_model_dir, digit_png, metadata_for, sample_instances

# --- batcher --------------------------------------------------------------------------------


class Recorder:
    """A 'model' that doubles its input and remembers every batch size it ran, in its own thread."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(len(batch))
        self.threads.add(threading.current_thread().name)
        return batch * 2.0


def run_clients(batcher: Batcher, requests: list[np.ndarray]) -> list[np.ndarray]:
    async def main() -> list[np.ndarray]:
        return await asyncio.gather(*(batcher.submit(r) for r in requests))

    return asyncio.run(main())


@pytest.mark.parametrize("inline_below_ms", [0.0, 1000.0])
def test_concurrent_requests_are_merged_and_each_gets_its_own_rows(inline_below_ms: float) -> None:
    model = Recorder()
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(model, executor, max_batch_size=8, inline_below_ms=inline_below_ms)
        requests = [np.full((1 + i % 3, 2), float(i)) for i in range(20)]
        answers = run_clients(batcher, requests)
    for request, answer in zip(requests, answers):
        np.testing.assert_array_equal(answer, request * 2.0)
    assert sum(model.sizes) == sum(len(r) for r in requests)
    assert max(model.sizes) <= 8 and len(model.sizes) < len(requests), model.sizes


def test_a_request_larger_than_a_batch_runs_whole_and_alone() -> None:
    model = Recorder()
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(model, executor, max_batch_size=4)
        answers = run_clients(batcher, [np.ones((10, 1)), np.ones((1, 1))])
    assert [len(a) for a in answers] == [10, 1] and model.sizes == [10, 1]


class CostClock:
    """The batcher's cost clock, moved by the 'models' below: each run costs what it says, on any machine."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_slow_runs_go_to_the_thread_and_fast_ones_stay_on_the_loop() -> None:
    """The rule, not this machine's speed: runs measured above inline_below_ms go to the thread, others stay."""
    clock = CostClock()

    class Costing(Recorder):
        def __init__(self, cost_s: float) -> None:
            super().__init__()
            self.cost_s = cost_s

        def __call__(self, batch: np.ndarray) -> np.ndarray:
            clock.now += self.cost_s
            return super().__call__(batch)

    slow, fast = Costing(0.005), Costing(0.0001)  # 5 ms and 0.1 ms a run, against a 1 ms limit
    with ThreadPoolExecutor(1, thread_name_prefix="model") as executor:
        for model in (slow, fast):
            batcher = Batcher(model, executor, max_batch_size=4, inline_below_ms=1.0, cost_clock=clock)
            for _ in range(3):
                run_clients(batcher, [np.ones((1, 1))])
    assert len(slow.sizes) == 3 and all(t.startswith("model") for t in slow.threads), slow.threads
    # The first run goes to the thread (nothing measured yet); once measured fast, the rest run inline.
    assert threading.main_thread().name in fast.threads, "measured-fast runs should run inline"


async def _until(condition, what: str, timeout: float = 30.0) -> None:
    """Yield to the loop until ``condition()`` holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


def test_wait_gathers_company_for_an_idle_model() -> None:
    model = Recorder()

    async def main(batcher: Batcher) -> None:
        first = asyncio.ensure_future(batcher.submit(np.ones((1, 1))))
        # The second arrives only once the batcher holds the first, waiting for company (a run of one without
        # the wait). The wait is generous; the second fills the batch, which ends it at once.
        await _until(lambda: batcher._arrived is not None, "the batcher to wait for company")
        await asyncio.gather(first, batcher.submit(np.ones((1, 1))))

    with ThreadPoolExecutor(1) as executor:
        asyncio.run(main(Batcher(model, executor, max_batch_size=2, max_wait_ms=60_000)))
    assert model.sizes == [2]


def test_a_failing_run_fails_only_its_own_batch() -> None:
    calls = []

    def flaky(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return batch

    async def main(batcher: Batcher) -> tuple[object, np.ndarray]:
        first = await asyncio.gather(batcher.submit(np.ones((1, 1))), return_exceptions=True)
        return first[0], await batcher.submit(np.ones((1, 1)))

    with ThreadPoolExecutor(1) as executor:
        error, answer = asyncio.run(main(Batcher(flaky, executor, max_batch_size=4)))
    assert isinstance(error, RuntimeError) and answer.shape == (1, 1)


def test_cancelled_requests_are_skipped() -> None:
    release = threading.Event()
    model = Recorder()

    def held(batch: np.ndarray) -> np.ndarray:
        assert release.wait(60), "never released"  # the first run lasts until the test has queued the others
        return model(batch)

    async def main(batcher: Batcher) -> np.ndarray:
        blocker = asyncio.ensure_future(batcher.submit(np.ones((1, 1))))
        await _until(lambda: batcher.running == 1, "the first run to start")  # the next two queue behind it
        gone = asyncio.ensure_future(batcher.submit(np.ones((3, 1))))
        kept = asyncio.ensure_future(batcher.submit(np.ones((1, 1))))
        await asyncio.sleep(0)
        gone.cancel()
        release.set()
        await blocker
        result = await kept
        assert await batcher.wait_idle(30)
        return result

    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(held, executor, max_batch_size=8, inline_below_ms=0)
        assert asyncio.run(main(batcher)).shape == (1, 1)
    assert model.sizes == [1, 1] and batcher.pending == 0


# --- images -----------------------------------------------------------------------------------


def test_digit_bitmap_becomes_exactly_its_block_counts() -> None:
    counts = sample_instances(3, seed=2)
    for instance in counts:
        for fmt in ("PNG",):
            array = decode_image(digit_png(instance, fmt), DIGITS_IMAGE)
            assert array.shape == (1, 8, 8) and array.dtype == np.float32
            np.testing.assert_allclose(array, instance, atol=1e-5)


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_transparent_areas_count_as_paper_and_colour_is_converted() -> None:
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black: blank paper, no ink
    assert decode_image(_png(rgba), DIGITS_IMAGE).max() == pytest.approx(0.0)
    red = Image.new("RGB", (16, 16), (255, 0, 0))
    rgb_spec = ImageSpec(mode="RGB", height=4, width=4, resample="bilinear", low=0.0, high=1.0)
    array = decode_image(_png(red), rgb_spec)
    assert array.shape == (3, 4, 4)
    np.testing.assert_allclose(array[:, 0, 0], [1.0, 0.0, 0.0], atol=1e-6)


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"", InvalidImage, "the file is empty"),
        (b"not an image at all", InvalidImage, "not a PNG or JPEG"),
        (digit_png(np.full(64, 5))[:50], InvalidImage, "corrupt PNG data"),
        (_png(Image.new("L", (4, 4)), "GIF"), UnsupportedImage, "GIF images are not accepted"),
        (_png(Image.new("L", (4, 4)), "BMP"), UnsupportedImage, "BMP images are not accepted"),
    ],
    ids=["empty", "garbage", "truncated", "gif", "bmp"],
)
def test_bad_uploads_are_named(data: bytes, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        decode_image(data, DIGITS_IMAGE, "file 'x'")


def test_image_recipe_from_metadata() -> None:
    assert image_spec(metadata_for((1, 8, 8), ["a"])) == DIGITS_IMAGE  # digits without a recipe
    assert image_spec(metadata_for((1, 40), ["a"], dataset="mnist1d")) is None
    recipe = {"mode": "RGB", "height": 4, "width": 5, "invert": False, "range": [-1, 1]}
    spec = image_spec(metadata_for((3, 4, 5), ["a"], dataset="x", preprocessing={"image": recipe}))
    assert spec is not None and (spec.low, spec.high, spec.shape) == (-1.0, 1.0, (3, 4, 5))
    with pytest.raises(ServingError, match="makes inputs of shape"):
        image_spec(metadata_for((1, 8, 8), ["a"], preprocessing={"image": recipe}))
    with pytest.raises(ServingError, match="resample 'fancy'"):
        image_spec(metadata_for((3, 4, 5), ["a"], preprocessing={"image": {**recipe, "resample": "fancy"}}))


# --- model pointer ----------------------------------------------------------------------------


def test_publish_points_the_root_at_a_model_dir(tmp_path: Path) -> None:
    v1 = build_model_dir(tmp_path / "models" / "v1")
    v2 = build_model_dir(tmp_path / "models" / "v2", seed=1, model_version="4")
    root = tmp_path / "live"
    assert resolve_model_dir(v1) == v1  # a plain model dir is served as is
    pointer = publish(root, v1)
    assert pointer == (root / POINTER_FILE).resolve()
    assert json.loads(pointer.read_text())["model_dir"] == "../models/v1", "relative, so the tree can move"
    assert resolve_model_dir(root) == v1.resolve()
    watcher = PointerWatcher(root, v1)
    assert watcher.poll() is None
    publish(root, v1)
    assert watcher.poll() is None, "republishing the live model changes nothing"
    publish(root, v2)
    assert watcher.poll() == v2.resolve()
    watcher.accept(v2)
    assert watcher.poll() is None
    assert not list(root.glob(".current.*")), "no temporary files left behind"


def test_a_publish_while_the_server_loads_is_not_missed(tmp_path: Path) -> None:
    """The server reads the pointer, loads and warms v1, then starts watching: v2 published meanwhile is news."""
    v1 = build_model_dir(tmp_path / "models" / "v1")
    v2 = build_model_dir(tmp_path / "models" / "v2", seed=1, model_version="4")
    root = tmp_path / "live"
    publish(root, v1)
    loaded = resolve_model_dir(root)
    publish(root, v2)  # during the load
    watcher = PointerWatcher(root, loaded)
    assert watcher.poll() == v2.resolve()


def test_publish_refuses_what_is_not_a_model_dir(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ServingError, match="not a model directory"):
        publish(tmp_path / "live", tmp_path / "empty")
    (tmp_path / "live").mkdir()
    (tmp_path / "live" / POINTER_FILE).write_text("{}")
    with pytest.raises(ServingError, match="expected"):
        read_pointer(tmp_path / "live")


# --- Open Inference Protocol tensors ----------------------------------------------------------


def test_v2_tensor_flat_or_nested() -> None:
    batch = sample_instances(2)
    tensor = {"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": batch.ravel().tolist()}
    np.testing.assert_array_equal(validate_tensor(tensor, "inputs[0]", "input", (1, 8, 8), 10), batch)
    nested = {**tensor, "data": batch.tolist()}
    np.testing.assert_array_equal(validate_tensor(nested, "inputs[0]", "input", (1, 8, 8), 10), batch)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"shape": [2, 64]}, "shape is [2, 64], expected [n, 1, 8, 8]"),
        ({"shape": [0, 1, 8, 8], "data": []}, "has no instances"),
        ({"shape": [2, 1, 8, True]}, "shape is"),
        ({"datatype": "INT64"}, "datatype is 'INT64'"),
        ({"data": [0.0] * 127}, "has 127 values"),
        ({"data": [[0.0] * 64, [0.0] * 63]}, "ragged"),
        ({"data": "abc"}, "data is a string"),
        ({"data": [0.0] * 127 + [float("inf")]}, "data[127] is Infinity"),
        ({"data": [0.0] * 127 + [None]}, "data[127] is null"),
        ({"name": None}, "name is null"),
    ],
)
def test_v2_tensor_mistakes(change: dict, message: str) -> None:
    tensor = {"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 128, **change}
    with pytest.raises(InvalidInstances) as caught:
        validate_tensor(tensor, "inputs[0]", "input", (1, 8, 8), 10)
    assert message in str(caught.value)


def test_v2_tensor_limit() -> None:
    tensor = {"name": "input", "shape": [11, 3], "datatype": "FP32", "data": [0.0] * 33}
    with pytest.raises(TooManyInstances, match="limit of 10"):
        validate_tensor(tensor, "inputs[0]", "input", (3,), 10)
