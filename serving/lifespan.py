"""What each worker runs beside its requests, from start-up to shutdown.

The app's lifespan: freeze start-up garbage, poll the model pointers (hot reload), keep
the drift gauges current, open the metrics flush channel; at shutdown stop those and drain
the model work still queued. Apart from the routes so that ``create_app`` only assembles.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from serving.server import ModelServer

logger = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Background work for ``app.state.server`` (none when it is unset: tests of the bare app)."""
    server: ModelServer | None = getattr(app.state, "server", None)
    watcher = None
    # Everything alive now (BentoML, FastAPI, onnxruntime, the model) lives as long as the
    # process: freezing it keeps the collector from re-scanning it in every full collection,
    # which stalled all requests for 100-200 ms about once a second under load (README).
    gc.collect()
    gc.freeze()
    if server is not None and server.watching:
        watcher = asyncio.create_task(server.watch(), name="fluxo-hot-reload")
    drift = None
    if server is not None and server.config.drift_status is not None:
        drift = asyncio.create_task(watch_drift(server.config.drift_status, server.config.reload_interval_s or 5.0),
                                    name="fluxo-drift-status")
    channel = server.metrics.channel if server is not None else None
    if channel is not None:
        await channel.open()  # other workers' scrapes ask this one to write its counts (serving/metrics.py)
    try:
        yield
    finally:
        for task in (watcher, drift):
            if task is not None:
                task.cancel()
        if server is not None:
            await server.drain()
        if channel is not None:
            await channel.close()  # after drain's last flush: a scrape meanwhile still got this worker's counts


async def watch_drift(path: Path, interval_s: float) -> None:
    """Keep the ``fluxo_drift_*`` gauges at the last verdict ``fluxo monitor`` wrote (serving/drift_status.py)."""
    from serving.drift_status import DriftStatus

    status = DriftStatus(path)
    while True:
        try:
            status.refresh()
        except Exception:  # the gauges must never take the server down
            logger.exception("drift status: could not read %s", path)
        await asyncio.sleep(interval_s)
