"""Image decoding as bounded work (serving/image_work.py): budget per request, a pool whose queue counts.

In process, with real PNG headers; where a test needs decoding to take a while it holds the
decoder on an event, so what runs, what queues and what is refused is decided by the test,
not by timing.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator

import numpy as np
import pytest

import serving.image_work as image_work
from serving.http import ApiError
from serving.image_work import INLINE_PIXELS, LARGE_BODY, LARGE_UPLOADS_PER_THREAD, ImageWork, declared_pixels
from serving.images import DIGITS_IMAGE, InvalidImage


def png(width: int, height: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (width, height), 255).save(out, "PNG")
    return out.getvalue()


BIG = png(1024, 1024)  # a few kilobytes declaring a million pixels
SMALL = png(32, 32)


class HeldDecoder:
    """Stands in for decode_opened: records the thread and waits until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Semaphore(0)
        self.threads: list[str] = []

    def __call__(self, image: object, spec: object, name: str) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        self.started.release()
        assert self.release.wait(30), "the test never released the decoder"
        return np.zeros(DIGITS_IMAGE.shape, np.float32)


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldDecoder]:
    decoder = HeldDecoder()
    monkeypatch.setattr(image_work, "decode_opened", decoder)
    yield decoder
    decoder.release.set()


async def _until(condition: object, what: str) -> None:
    for _ in range(2000):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting until {what}")


def test_a_request_over_its_pixel_budget_is_refused_before_decoding(held: HeldDecoder) -> None:
    work = ImageWork(threads=1, queue_pixels=10**8, request_pixels=3 * 1024 * 1024)
    with pytest.raises(ApiError) as refused:
        asyncio.run(work.decode(lambda: [(f"f{i}", BIG) for i in range(4)], DIGITS_IMAGE))
    assert refused.value.status == 413 and "FLUXO_MAX_REQUEST_PIXELS" in refused.value.message
    assert "4194304 pixels" in refused.value.message
    assert held.threads == [] and work.pending_pixels == 0


def test_small_images_decode_inline_and_large_ones_on_the_pool(held: HeldDecoder) -> None:
    held.release.set()
    work = ImageWork(threads=1, queue_pixels=10**8, request_pixels=10**8)
    assert 32 * 32 <= INLINE_PIXELS < 1024 * 1024
    asyncio.run(work.decode(lambda: [("small", SMALL)], DIGITS_IMAGE))
    asyncio.run(work.decode(lambda: [("big", BIG)], DIGITS_IMAGE))
    assert held.threads[0] == threading.current_thread().name
    assert held.threads[1].startswith("fluxo-image")


def test_work_beyond_the_queue_is_refused_at_once_and_admitted_again_once_done(held: HeldDecoder) -> None:
    work = ImageWork(threads=1, queue_pixels=int(1.5 * 1024 * 1024), request_pixels=10**8)

    async def scenario() -> None:
        first = asyncio.create_task(work.decode(lambda: [("big", BIG)], DIGITS_IMAGE))
        await _until(lambda: work.pending_pixels == 1024 * 1024, "the first request is counted")
        with pytest.raises(ApiError) as refused:
            await work.decode(lambda: [("big", BIG)], DIGITS_IMAGE)
        assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "1"}
        held.release.set()
        assert (await first).shape == (1, *DIGITS_IMAGE.shape)
        await _until(lambda: work.pending_pixels == 0, "the pixels are released")
        assert (await work.decode(lambda: [("big", BIG)], DIGITS_IMAGE)).shape == (1, *DIGITS_IMAGE.shape)

    asyncio.run(scenario())


def test_a_request_that_goes_away_leaves_no_work_queued_and_its_pixels_are_released(held: HeldDecoder) -> None:
    work = ImageWork(threads=1, queue_pixels=10**8, request_pixels=10**8)

    async def scenario() -> None:
        running = asyncio.create_task(work.decode(lambda: [("a", BIG), ("b", BIG)], DIGITS_IMAGE))
        await asyncio.to_thread(held.started.acquire)  # the first file is being decoded
        queued = asyncio.create_task(work.decode(lambda: [("c", BIG)], DIGITS_IMAGE))
        await _until(lambda: work.pending_pixels == 3 * 1024 * 1024, "both requests are counted")
        queued.cancel()  # never started: cancelled in the queue, its pixels released at once
        await _until(lambda: work.pending_pixels == 2 * 1024 * 1024, "the queued request is released")
        running.cancel()  # the thread finishes its current file and stops before the next
        await _until(running.done, "the request is gone")
        held.release.set()
        await _until(lambda: work.pending_pixels == 0, "the running request is released")

    asyncio.run(scenario())
    assert held.threads == ["fluxo-image_0"], "a cancelled request's remaining files were decoded"


@pytest.mark.parametrize("data,problem", [(b"", "empty"), (b"\x89PNG\r\n", "not a PNG or JPEG"),
                                          (png(4097, 4097), "more than the limit")])
def test_headers_that_cannot_be_read_are_the_clients_mistake(data: bytes, problem: str) -> None:
    with pytest.raises(InvalidImage, match=problem):
        declared_pixels(data, "upload.png")


def test_a_large_upload_is_read_sized_and_decoded_on_the_pool_and_its_slots_are_bounded(held: HeldDecoder) -> None:
    work = ImageWork(threads=1, queue_pixels=10**8, request_pixels=3 * 1024 * 1024)
    on = []

    def read() -> list[tuple[str, bytes]]:
        on.append(threading.current_thread().name)
        return [("big", BIG)]

    async def scenario() -> None:
        assert work.admit_upload(str(LARGE_BODY)) is True  # counted: upload_done must follow
        assert work.admit_upload("300") is False  # a digit-sized body is never held back
        refused = None
        for _ in range(LARGE_UPLOADS_PER_THREAD):
            try:
                work.admit_upload(None)  # unknown length counts as large
            except ApiError as error:
                refused = error
        assert refused is not None and refused.status == 429  # the slots of one thread are full
        held.release.set()
        assert (await work.decode(read, DIGITS_IMAGE, large=True)).shape == (1, *DIGITS_IMAGE.shape)
        with pytest.raises(ApiError) as too_big:  # the budget is checked on the pool too
            await work.decode(lambda: [(f"f{i}", BIG) for i in range(4)], DIGITS_IMAGE, large=True)
        assert too_big.value.status == 413

    asyncio.run(scenario())
    assert on == ["fluxo-image_0"] and held.threads == ["fluxo-image_0"]
    assert work.pending_pixels == 0
