"""Adaptive batching inside the serving process: concurrent requests share one model run.

Each request is validated on its own first, then queued here as a float32 array.
One task drains the queue: it takes the waiting requests (up to
``max_batch_size`` instances, never splitting one), concatenates them, runs the
model once in a dedicated thread, and hands every request back exactly its own
rows. While that run is in progress new requests queue up and form the next
batch, so the batch size follows the load with no timer: one instance at a time
when idle, full batches under pressure. ``max_wait_ms`` optionally holds an
idle model back for company; the measurements in serving/README.md chose 0.

Runs that typically take under ``inline_below_ms`` (a small CNN on a CPU) run on
the event loop itself: handing them to the thread and back costs two GIL
hand-overs, more than the run. Slower models, and requests larger than a
batch, always go to the thread so the loop keeps accepting requests meanwhile.
"Typically" is measured with ``cost_clock``: the server passes the thread's CPU time
for a one-thread CPU session, so a run the OS preempted on a busy machine does not
read as a slow model and send the next runs through the thread (wall time otherwise:
a GPU run's wait is time the loop would be blocked).

``on_output`` sees every run's merged input and output once its requests have
their rows: shadow mode (serving/rollout.py) mirrors whole champion batches to
the challenger from there, so a mirrored request costs no task or future of its own.

It lives in the same process as the HTTP handlers on purpose. BentoML 1.4's own
batching merges calls *into* a separate model service, which costs an extra
HTTP hop and serialisation per call; on 2 cores that hop cost more than the
whole request (serving/README.md has the figures).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    batch: np.ndarray
    future: asyncio.Future[np.ndarray]


BatchObserver = Callable[[int, int, float], None]
"""Called after each model run with (instances, requests, seconds)."""

OutputHook = Callable[[np.ndarray, np.ndarray, Sequence[int]], None]
"""Called after each model run, its requests answered, with (merged input, output, instances per request)."""


class Batcher:
    """Merge concurrent ``submit`` calls into single runs of ``run`` (instances along axis 0)."""

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        executor: Executor,
        *,
        max_batch_size: int,
        max_wait_ms: float = 0.0,
        inline_below_ms: float = 1.0,
        cost_clock: Callable[[], float] = time.perf_counter,
        observe: BatchObserver | None = None,
        on_output: OutputHook | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self._run = run
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self._observe = observe
        self._on_output = on_output
        self.inline_below_s = inline_below_ms / 1000.0
        self._cost_clock = cost_clock
        self._typical_run_s = float("inf")  # until measured, runs go to the thread
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_instances = 0
        self._drainer: asyncio.Task[None] | None = None
        self._arrived: asyncio.Event | None = None
        self.running = 0  # instances inside the model right now

    @property
    def pending(self) -> int:
        """Instances queued or running: zero means idle."""
        return self._queued_instances + self.running

    async def submit(self, batch: np.ndarray) -> np.ndarray:
        """The model's output rows for ``batch``, run together with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        job = _Job(batch, loop.create_future())
        self._queue.append(job)
        self._queued_instances += len(batch)
        if self._arrived is not None:
            self._arrived.set()
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        return await job.future

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or running; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.pending:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def _gather_company(self) -> None:
        """Hold an idle model for up to max_wait for more instances to arrive."""
        deadline = time.monotonic() + self.max_wait_s
        self._arrived = asyncio.Event()
        try:
            while self._queued_instances < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    return
        finally:
            self._arrived = None

    def _take(self) -> list[_Job]:
        """The next batch: the head job (whatever its size), then whole jobs while they fit."""
        jobs: list[_Job] = []
        size = 0
        while self._queue:
            job = self._queue[0]
            if job.future.done():  # the client went away (timeout, disconnect): skip its work
                self._queue.popleft()
                self._queued_instances -= len(job.batch)
                continue
            if jobs and size + len(job.batch) > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_instances -= len(job.batch)
            jobs.append(job)
            size += len(job.batch)
        return jobs

    def _timed_run(self, batch: np.ndarray) -> tuple[np.ndarray, float, float]:
        """The output, the model's own wall time (without the hand-over to and from the thread) and its cost."""
        started, cost_started = time.perf_counter(), self._cost_clock()
        output = self._run(batch)
        return output, time.perf_counter() - started, self._cost_clock() - cost_started

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            if self.max_wait_s > 0 and self._queued_instances < self.max_batch_size:
                await self._gather_company()
            else:
                # One turn of the loop lets requests already parsed in this tick join the batch.
                await asyncio.sleep(0)
            jobs = self._take()
            if not jobs:
                continue
            merged = jobs[0].batch if len(jobs) == 1 else np.concatenate([job.batch for job in jobs])
            self.running = len(merged)
            try:
                if len(merged) <= self.max_batch_size and self._typical_run_s < self.inline_below_s:
                    # A sub-millisecond run costs less than handing it to a thread and back
                    # (each hand-over waits for the GIL), so it runs right here.
                    output, elapsed, cost = self._timed_run(merged)
                else:
                    output, elapsed, cost = await loop.run_in_executor(self._executor, self._timed_run, merged)
            except Exception as error:  # noqa: BLE001 - every waiting request must hear about it
                logger.exception("model run failed for a batch of %d instances", len(merged))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            finally:
                self.running = 0
            per_run = cost if self._typical_run_s == float("inf") else 0.8 * self._typical_run_s + 0.2 * cost
            self._typical_run_s = per_run
            offset = 0
            for job in jobs:
                rows = output[offset : offset + len(job.batch)]
                offset += len(job.batch)
                if not job.future.done():
                    job.future.set_result(rows)
            if self._observe is not None:
                self._observe(len(merged), len(jobs), elapsed)
            if self._on_output is not None:
                self._hand_over(merged, output, jobs)

    def _hand_over(self, merged: np.ndarray, output: np.ndarray, jobs: list[_Job]) -> None:
        """Give ``on_output`` the run; its failure is logged, never the batcher's (its requests are answered)."""
        try:
            self._on_output(merged, output, [len(job.batch) for job in jobs])
        except Exception:  # noqa: BLE001 - the drain loop must go on for the next batch
            logger.exception("on_output hook failed for a batch of %d instances", len(merged))
