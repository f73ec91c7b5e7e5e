"""The inference routes answered straight from the ASGI scope, below BentoML's traffic control.

Profiled under load (py-spy on both workers, 32 clients, serving/README.md "Request path"):
about 40% of a ``/predict`` request's CPU went to the layers between uvicorn and the handler,
not to parsing, validating or the model: BentoML's ``ContextMiddleware`` (a Starlette
``Request`` and a context manager per request), Starlette's router and ``Mount("/")``, then
FastAPI's own ``ServerErrorMiddleware``, ``ExceptionMiddleware``, ``AsyncExitStack``,
routing and dependency solving, each of them wrapping ``send`` once more, so every
response message went through eight Python frames before reaching the socket. The Open
Inference Protocol's infer routes and ``/predict/image`` paid the same, so they ran at 0.4 and
0.3 of ``/predict``'s rate; every inference route is answered here now.

This middleware is added to the BentoML service (``add_asgi_middleware``), which places it
inside BentoML's ``TimeoutMiddleware``, so 504 behaves as before, and outside everything
listed above. Each route is answered by the very function its FastAPI route calls
(serving/routes_predict.py, serving/routes_v2.py: one definition of the validation, limits,
API key, cross-site check, rollout and payload log), and admitted and counted with the functions
:class:`serving.admission.RequestAccounting` uses for every other request (429 beyond
``FLUXO_MAX_CONCURRENCY``, in-progress gauge, count and time by route template). Every other
request, and every request before the model is loaded, goes down the full stack unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from serving.admission import admit, settle
from serving.http import ApiError, Receive, error_response
from serving.routes_predict import image_response, predict_response
from serving.routes_v2 import infer_answer
from serving.server import ModelServer

logger = logging.getLogger(__name__)

Handler = Callable[[ModelServer, Headers, Receive], Awaitable[Response]]
V2_INFER = "/v2/models/{model_name}/infer"
V2_INFER_VERSION = "/v2/models/{model_name}/versions/{model_version}/infer"


def _infer(model_name: str, model_version: str | None) -> Handler:
    async def answer(server: ModelServer, headers: Headers, receive: Receive) -> Response:
        return await infer_answer(server, headers, receive, model_name, model_version)

    return answer


_FIXED: dict[str, Handler] = {"/predict": predict_response, "/predict/image": image_response}


def route_of(path: str) -> tuple[str, Handler] | None:
    """(route template, handler) of a ``POST`` to an inference route, else None.

    The v2 templates match as Starlette's would: a path parameter is one non-empty segment.
    """
    handler = _FIXED.get(path)
    if handler is not None:
        return path, handler
    if not path.startswith("/v2/models/") or not path.endswith("/infer"):
        return None
    parts = path.split("/")  # "", "v2", "models", name, ["versions", version,] "infer"
    if len(parts) == 5 and parts[3]:
        return V2_INFER, _infer(parts[3], None)
    if len(parts) == 7 and parts[3] and parts[4] == "versions" and parts[5]:
        return V2_INFER_VERSION, _infer(parts[3], parts[5])
    return None


class InferenceFastPath:
    """ASGI middleware: the inference routes here, everything else to ``app``; ``state`` holds ``server``."""

    def __init__(self, app: Any, state: Any) -> None:
        self.app = app
        self.state = state  # the FastAPI app's state: the service sets ``state.server`` once the model is loaded

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        server = getattr(self.state, "server", None)
        matched = None
        if server is not None and scope["type"] == "http" and scope["method"] == "POST":
            matched = route_of(scope["path"])
        if matched is None:
            await self.app(scope, receive, send)
            return
        route, handler = matched
        metrics = server.metrics
        started = time.perf_counter()
        # Refused under its own route, unlike the full stack's "limited": here the route is known before admission.
        refused = admit(metrics, server, route, "POST", started)
        if refused is not None:
            await refused(scope, receive, send)
            return
        status = 499  # until an answer is ready: the client went away, or the timeout cancelled us
        try:
            try:
                response = await handler(server, Headers(scope=scope), receive)
            except ApiError as error:
                response = error_response(error.status, error.message, error.headers)
            except ClientDisconnect:
                return
            except Exception:  # a server fault answers 500 with a sentence, and is logged
                logger.exception("POST %s failed", route)
                response = error_response(500, "internal error while answering; the server log has the cause")
            status = response.status_code
        finally:
            settle(metrics, route, "POST", status, started)  # before the answer is sent (admission.settle)
        await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})
