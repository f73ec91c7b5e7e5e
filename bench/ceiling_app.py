"""The ceiling of bench/serve.py: what a Python server does on this machine with no model at all.

A bare ASGI app under uvicorn (httptools, uvloop; the worker count fluxo uses): it reads
the request body, parses it with orjson, and answers a constant prediction shaped like
fluxo's. Every serving table shows fluxo's requests/s as a share of this one, measured in
the same run, so the number says how much of the machine's HTTP capacity the model path
leaves on the table, whatever the machine.
"""

from __future__ import annotations

from typing import Any

import orjson

ANSWER = orjson.dumps({"predictions": [{"label": "0", "probabilities": [1.0] + [0.0] * 9}], "model_version": "1"})
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await parse_and_answer(receive, send, parse=scope["method"] == "POST")


async def parse_and_answer(receive: Any, send: Any, parse: bool = True) -> None:
    """Read the whole body, parse it with orjson, answer the constant (bench/bentoml_floor.py does the same)."""
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if parse:
        orjson.loads(body)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})
