"""Blocking operations work (``/metrics``, ``/report``, hot reloads) on a small pool of its own.

Why: these used to run on the event loop's default pool (``asyncio.to_thread``), which image
decoding shared; a flood of large uploads then held every thread, so a scrape, a report or a
reload waited behind client traffic. Image decoding has its own bounded pool now
(serving/image_work.py) and operations this one, so neither can starve the other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fluxo-ops")


async def run_ops(work: Callable[..., T], *args: object) -> T:
    """``work(*args)`` on the operations pool, awaited."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, work, *args)
