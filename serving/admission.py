"""Admission and accounting: one set of rules for every request a worker takes, whichever way it came.

A request reaches the model by two paths: down the FastAPI stack (every route, through
:class:`RequestAccounting`) or, for ``POST /predict``, by the ASGI fast path below the
framework (serving/fastpath.py). Both must refuse the same requests (429 beyond
``FLUXO_MAX_CONCURRENCY``), keep the same in-progress gauge and count and time requests
by route the same way, or ``/metrics`` would tell two stories; so both call
:func:`admit` before the work and :func:`settle` after it.

fluxo's own limit, not BentoML's ``MaxConcurrencyMiddleware``: that one is an asyncio
semaphore whose ``locked()`` scans its waiters on every request; this is one integer
compare (serving/README.md, "Request path"). Probes never reach the app, and
``/metrics`` is neither limited nor counted in progress, as with BentoML's.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.responses import Response

from serving.http import error_response
from serving.metrics import Metrics, get_metrics
from serving.server import ModelServer

METRICS_ROUTE = "/metrics"
LIMITED = "limited"
"""The route label of a 429 refused by :class:`RequestAccounting`: admission comes before routing,
so the route is not known yet, and the raw path is the client's to choose."""


def over_capacity(metrics: Metrics, server: ModelServer | None) -> Response | None:
    """The 429 for a request beyond ``FLUXO_MAX_CONCURRENCY`` in this worker, else None."""
    if server is None or metrics.in_flight < server.config.max_concurrency:
        return None
    return error_response(429, f"Too many requests: this worker is answering {metrics.in_flight} already "
                               "(FLUXO_MAX_CONCURRENCY); retry shortly", {"Retry-After": "1"})


def admit(metrics: Metrics, server: ModelServer | None, route: str, method: str, started: float) -> Response | None:
    """Take a request in, or refuse it.

    None: admitted and counted in progress; :func:`settle` must follow, once. A response:
    the 429 to send, already counted under ``route``; nothing to settle.
    """
    refused = over_capacity(metrics, server)
    if refused is not None:
        metrics.request(route, method, 429, time.perf_counter() - started)
        return refused
    metrics.enter()
    return None


def settle(metrics: Metrics, route: str, method: str, status: int, started: float, admitted: bool = True) -> None:
    """A request is done: out of the in-progress gauge (when :func:`admit` took it in), counted and timed.

    Callers settle before the answer's last byte is sent: a client holding its answer that
    then scrapes ``/metrics``, on any worker, finds it counted (serving/metrics.py, FlushChannel).
    """
    if admitted:
        metrics.leave()
    metrics.request(route, method, status, time.perf_counter() - started)


class RequestAccounting:
    """ASGI middleware around the FastAPI app: every request admitted or 429, counted in progress while
    it runs, then counted and timed by route template (never by raw path, which clients control)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        metrics = get_metrics()
        method = scope["method"]
        counted = scope["path"] != METRICS_ROUTE  # a scrape is neither limited nor counted in progress
        if counted:
            refused = admit(metrics, getattr(scope["app"].state, "server", None), LIMITED, method, started)
            if refused is not None:
                await refused(scope, receive, send)
                return
        accounted = False

        def account() -> None:
            nonlocal accounted
            if accounted:
                return
            accounted = True
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            settle(metrics, route, method, status, started, admitted=counted)

        async def record_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                account()  # before the last byte goes out
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        except asyncio.CancelledError:
            status = 499  # the client or the timeout gave up; nginx's name for it
            raise
        finally:
            account()  # an answer never completed (an error, a cancellation) is counted here
