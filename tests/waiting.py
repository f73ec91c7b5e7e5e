"""Waiting on a condition instead of sleeping: the one way tests synchronise with servers, threads and processes.

A fixed sleep is either too short on a busy 2-core CI machine (the test fails) or too long
everywhere else (the suite crawls); a poll with a generous deadline is neither.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str, timeout: float = 60.0, interval: float = 0.02,
             detail: Callable[[], object] | None = None) -> T:
    """Call ``condition`` until it returns something truthy, and return that; fail naming ``what`` at the deadline.

    ``condition`` may raise to fail at once (a client thread that died, a process that exited).
    ``detail`` is called on a timeout for what to show beside ``what`` (a log tail, the answers so far).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(interval)


def raise_if_any_failed(futures: Iterable[Future]) -> None:
    """Re-raise the first exception of a finished future: for a wait's condition, so a dead client fails the test now."""
    for future in futures:
        if future.done() and future.exception() is not None:
            raise AssertionError(f"a client thread failed: {future.exception()!r}") from future.exception()


def exceptions_of(futures: Iterable[Future], timeout: float = 120.0) -> list[BaseException]:
    """Join every future (each within ``timeout``) and return the exceptions they ended with, none dropped."""
    return [error for future in futures if (error := future.exception(timeout=timeout)) is not None]
