"""The floor under fluxo in bench/serve.py: BentoML as fluxo configures it, answering a constant.

    bentoml serve bentoml_floor:Floor --working-dir bench --port 3000

The same service settings as serving/service.py (workers, BentoML's request metrics and access
log off, tracing skipped on /predict, BentoML's timeout) and a middleware in the place of fluxo's
fast path (serving/fastpath.py) that reads the body, parses it with orjson and answers the
ceiling's constant (bench/ceiling_app.py). What this serves per second is the most fluxo could
serve inside BentoML on this machine; the gap to the ceiling is BentoML's own layers that cannot
be turned off (its Starlette app and error middleware, the OpenTelemetry middleware's URL check,
the timeout middleware's task and timer per request).
"""

from __future__ import annotations

import os
from typing import Any

import bentoml
from ceiling_app import parse_and_answer
from fastapi import FastAPI

app = FastAPI()


class ConstantPredict:
    """Where fluxo's fast path sits: POST /predict parsed and answered with a constant."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/predict":
            await self.app(scope, receive, send)
            return
        await parse_and_answer(receive, send)


@bentoml.service(name="floor", workers=int(os.environ.get("FLUXO_WORKERS", "2")), traffic={"timeout": 10},
                 logging={"access": {"enabled": False}}, metrics={"enabled": False},
                 tracing={"excluded_urls": ["/predict", "/v2/models/"]})
@bentoml.asgi_app(app, path="/")
class Floor:
    """No model: the service exists so BentoML builds its app and workers around the middleware."""


Floor.add_asgi_middleware(ConstantPredict)
