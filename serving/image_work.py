"""Image decoding as bounded work: a pixel budget per request and a pool of its own whose queue counts.

Why this exists: the body limit does not bound an image request's work. A blank 4096x4096 PNG
is a few kilobytes, so one 4 MB request could carry dozens of them, each decoding into several
full-size copies. Decoding used to run on the event loop's default pool (``asyncio.to_thread``),
shared with ``/metrics``, ``/report`` and hot reloads; a request that timed out (504) left its
thread working, and the 429 limit counted requests, not the work still running. Measured on the
digits champion (serving/README.md, "Bounded image work"): 16 clients flooding such requests
made every one of them time out, cut ordinary ``/predict`` traffic beside them from ~1,600 to
128 req/s and grew the server by 927 MB.

So, per worker:

- every file's size is read from its header before anything is decoded, and a request whose
  files add up to more than ``FLUXO_MAX_REQUEST_PIXELS`` answers 413 at once;
- files of at most :data:`INLINE_PIXELS` in all (a digit-sized upload) are decoded on the event
  loop: tens of microseconds, less than handing them to a thread and back;
- anything larger goes to this worker's own decoding threads (``FLUXO_IMAGE_THREADS``). The
  pixels queued or being decoded are counted from submission until the thread is really done
  with them, so a request that would take the count past ``FLUXO_IMAGE_QUEUE_PIXELS`` answers
  429 with ``Retry-After`` at once instead of waiting to time out;
- a request that goes away (timeout, disconnect) has its queued work cancelled, and work already
  running stops at the next file.

Memory is then bounded by the decoding threads (each holds one image's copies at a time) plus
the compressed bodies waiting in the queue, not by how many clients send images.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from serving.http import ApiError
from serving.images import ImageSpec, InvalidImage, UnsupportedImage, decode_opened, open_upload

LARGE_BODY = 16 * 1024
"""An upload body at least this big (or of unknown length) is a large upload: at most
:data:`LARGE_UPLOADS_PER_THREAD` per decoding thread are taken in at once per worker, and one beyond
that is refused (429) before its body is read; a large upload is parsed, sized and decoded on the
pool, at its lower priority. Parsing a 700 KB multipart body is itself CPU work: a flood of them
starved ordinary traffic even once each was refused with 413 after parsing. Digit-sized uploads
(hundreds of bytes) are never held back and decode inline."""
LARGE_UPLOADS_PER_THREAD = 1

INLINE_PIXELS = 128 * 128
"""Requests whose images hold at most this many pixels in all are decoded on the event loop: a
32x32 digit decodes in ~50 us, about what a thread hop costs; 16k pixels stays well under a millisecond."""

Files = Sequence[tuple[str, bytes]]


def declared_pixels(data: bytes, name: str) -> int:
    """Width × height from the file's header alone (Pillow decodes nothing until ``load()``)."""
    width, height = open_upload(data, name).size
    return width * height


class _Abandoned(Exception):
    """The request went away while its files were being decoded; nobody reads this."""


def _decode_all(files: Sequence[tuple[str, Any]], spec: ImageSpec,
                stop: threading.Event | None = None) -> np.ndarray:
    """(name, opened image) of every file → the batch; ``stop`` set: the request is gone, stop at the next file."""
    rows = []
    for name, image in files:
        if stop is not None and stop.is_set():
            raise _Abandoned
        rows.append(decode_opened(image, spec, name))
    return np.stack(rows)


DECODE_NICENESS = 10
"""How much lower than the event loop the decoding threads run (Linux nice is per thread). A 16-megapixel
PNG takes ~0.4 s of CPU to decode; at equal priority two such decodes took both cores of a 2-core box
from the requests that only need a model run. At nice 10 the scheduler gives the event loop ~9 of 10
time slices when both want the CPU, and the decoders all of it when nothing else does."""


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICENESS)
    except (OSError, AttributeError):  # not Linux, or not allowed: decode at normal priority
        pass


def _libc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_MALLOC_TRIM = _libc_trim()


def _give_back_memory() -> None:
    """Return the freed pages of large decodes to the system once the pool is idle.

    glibc raises its mmap threshold after a large block is freed, so the next images' buffers
    (16 MB for a 16-megapixel grey image) come from the heap, and freed heap stays with the
    process: after a flood the server kept hundreds of MB it no longer used. ``malloc_trim``
    hands it back; it runs on the decoding thread, after work that took far longer.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class ImageWork:
    """One worker's image decoding: the per-request budget, the inline cut-off and the bounded pool."""

    def __init__(self, threads: int, queue_pixels: int, request_pixels: int) -> None:
        self.queue_pixels = queue_pixels
        self.request_pixels = request_pixels
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fluxo-image",
                                        initializer=_lower_priority)
        self._lock = threading.Lock()
        self._pending = 0  # pixels submitted and not yet released by the thread that decodes them
        self._uploads = 0  # large uploads being read, parsed or decoded (event loop only: no lock)
        self._upload_limit = LARGE_UPLOADS_PER_THREAD * threads
        self._last_trim = 0.0

    @property
    def pending_pixels(self) -> int:
        return self._pending

    def admit_upload(self, declared_length: str | None) -> bool:
        """Count a large upload in (True; :meth:`upload_done` must follow), pass a small one (False), or 429."""
        try:
            large = declared_length is None or int(declared_length) >= LARGE_BODY
        except ValueError:
            return False  # the body reader answers 400 for it
        if not large:
            return False
        if self._uploads >= self._upload_limit:
            # Not with "Connection: close": the server would close with the body unread, and the client,
            # still sending it, gets a reset instead of this answer (the soak counted 904 of them).
            raise ApiError(429, f"this worker is reading {self._uploads} large uploads already (over "
                                f"{LARGE_BODY // 1024} KB each); retry shortly", {"Retry-After": "1"})
        self._uploads += 1
        return True

    def upload_done(self) -> None:
        self._uploads -= 1
        if self._uploads == 0:
            self._trim_when_idle()

    def _trim_when_idle(self) -> None:
        """Give freed memory back once no large upload or decode is in progress, at most once a second,
        on the decoding thread (idle then, so at once): a flood of large bodies refused before decoding
        left the multipart parser's garbage with the process otherwise."""
        now = time.monotonic()
        if self._pending == 0 and now - self._last_trim >= 1.0:
            self._last_trim = now
            self._pool.submit(_give_back_memory)

    async def decode(self, read: Callable[[], Files], spec: ImageSpec, large: bool = False) -> np.ndarray:
        """The request's files as one batch (n, *spec.shape); 400/413/415/429 as :class:`ApiError`.

        ``read`` gives the files (parsing the body when it is multipart). A ``large`` upload (one
        :meth:`admit_upload` counted) is read, sized and decoded entirely on the pool, at its lower
        priority: the event loop only received its bytes.
        """
        try:
            if large:
                return await self._large(read, spec)
            opened, total = self._opened(read())
            if total <= INLINE_PIXELS:
                return _decode_all(opened, spec)
            return await self._on_pool(opened, spec, total)
        except UnsupportedImage as error:
            raise ApiError(415, str(error)) from None
        except InvalidImage as error:
            raise ApiError(400, str(error)) from None

    def _opened(self, files: Files) -> tuple[list[tuple[str, Any]], int]:
        """Every file opened from its header, and their pixels in all; 413 over the request's budget."""
        opened = [(name, open_upload(data, name)) for name, data in files]
        total = sum(image.size[0] * image.size[1] for _, image in opened)
        if total > self.request_pixels:
            raise ApiError(413, f"the {len(files)} image(s) hold {total} pixels in all, more than the limit of "
                                f"{self.request_pixels} per request (FLUXO_MAX_REQUEST_PIXELS); send fewer or "
                                "smaller images per request")
        return opened, total

    async def _large(self, read: Callable[[], Files], spec: ImageSpec) -> np.ndarray:
        stop = threading.Event()

        def job() -> np.ndarray:
            opened, total = self._opened(read())
            with self._lock:
                self._pending += total  # seen by the requests that queue beside it
            try:
                return _decode_all(opened, spec, stop)
            finally:
                self._release(total)

        try:
            return await asyncio.wrap_future(self._pool.submit(job))
        finally:
            stop.set()

    async def _on_pool(self, files: Sequence[tuple[str, Any]], spec: ImageSpec, pixels: int) -> np.ndarray:
        with self._lock:
            # One request alone may always run (its size is already within the per-request budget).
            if self._pending and self._pending + pixels > self.queue_pixels:
                raise ApiError(429, f"this worker is decoding {self._pending} pixels of images already "
                                    "(FLUXO_IMAGE_QUEUE_PIXELS); retry shortly", {"Retry-After": "1"})
            self._pending += pixels
        stop = threading.Event()
        job: Future[np.ndarray] = self._pool.submit(_decode_all, files, spec, stop)
        job.add_done_callback(lambda _: self._release(pixels))  # when the thread is done, or the job cancelled
        try:
            return await asyncio.wrap_future(job)  # cancelling this cancels a job still queued
        finally:
            stop.set()

    def _release(self, pixels: int) -> None:
        with self._lock:
            self._pending -= pixels
            idle = self._pending == 0
        if idle:
            self._last_trim = time.monotonic()
            _give_back_memory()  # on the decoding thread that just finished: the pool is idle

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
