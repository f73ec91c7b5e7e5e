"""``POST /predict`` answered straight from the ASGI scope, below BentoML's traffic control.

Profiled under load (py-spy on both workers, 32 clients, serving/README.md "Request path"):
about 40% of a ``/predict`` request's CPU went to the layers between uvicorn and the handler,
not to parsing, validating or the model: BentoML's ``ContextMiddleware`` (a Starlette
``Request`` and a context manager per request), Starlette's router and ``Mount("/")``, then
FastAPI's own ``ServerErrorMiddleware``, ``ExceptionMiddleware``, ``AsyncExitStack``,
routing and dependency solving, each of them wrapping ``send`` once more, so every
response message went through eight Python frames before reaching the socket.

This middleware is added to the BentoML service (``add_asgi_middleware``), which places it
inside BentoML's ``TimeoutMiddleware``, so 504 behaves as before, and outside everything
listed above. It answers ``POST /predict`` with the route's own function
(:func:`serving.routes_predict.predict_response`: one definition of the validation, limits,
API key, rollout and payload log), and admits and counts it with the functions
:class:`serving.admission.RequestAccounting` uses for every other request (429 beyond
``FLUXO_MAX_CONCURRENCY``, in-progress gauge, count and time by route). Every other request,
and every request before the model is loaded, goes down the full stack unchanged.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect

from serving.admission import admit, settle
from serving.http import ApiError, error_response
from serving.routes_predict import predict_response

logger = logging.getLogger(__name__)

ROUTE = "/predict"


class PredictFastPath:
    """ASGI middleware: ``POST /predict`` here, everything else to ``app``; ``state`` holds ``server``."""

    def __init__(self, app: Any, state: Any) -> None:
        self.app = app
        self.state = state  # the FastAPI app's state: the service sets ``state.server`` once the model is loaded

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        server = getattr(self.state, "server", None)
        if server is None or scope["type"] != "http" or scope["path"] != ROUTE or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        metrics = server.metrics
        started = time.perf_counter()
        # Refused under its own route, unlike the full stack's "limited": here the route is known before admission.
        refused = admit(metrics, server, ROUTE, "POST", started)
        if refused is not None:
            await refused(scope, receive, send)
            return
        status = 499  # until an answer is ready: the client went away, or the timeout cancelled us
        try:
            try:
                response = await predict_response(server, Headers(scope=scope), receive)
            except ApiError as error:
                response = error_response(error.status, error.message, error.headers)
            except ClientDisconnect:
                return
            except Exception:  # a server fault answers 500 with a sentence, and is logged
                logger.exception("POST /predict failed")
                response = error_response(500, "internal error while answering; the server log has the cause")
            status = response.status_code
        finally:
            settle(metrics, ROUTE, "POST", status, started)  # before the answer is sent (admission.settle)
        await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})
