"""The HTTP rules every route shares: errors, body limits, JSON, the API key.

The FastAPI routers (serving/routes_*.py) and the ASGI fast path (serving/fastpath.py)
answer the same requests the same way only if they read bodies, parse JSON, check the
key and word their errors with the same functions; those functions live here, apart
from any route, so neither side owns them. Every client mistake is an :class:`ApiError`:
a 4xx with ``{"error": ...}``.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from serving.schemas import ErrorResponse, InvalidInstances, TooManyInstances

JSON_TYPES = ("application/json", "text/json")

Receive = Callable[[], Awaitable[dict[str, Any]]]


class ApiError(Exception):
    """An answer other than 200: status, the sentence for ``{"error": ...}`` and extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """``{"error": message}`` built without the framework: for answers given outside FastAPI's handlers."""
    return Response(orjson.dumps({"error": message}), status_code=status, headers=headers,
                    media_type="application/json")


def json_response(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


def invalid(error: InvalidInstances) -> ApiError:
    """A validation failure as the answer it deserves: too many instances is 413, anything else 400."""
    return ApiError(413 if isinstance(error, TooManyInstances) else 400, str(error))


# --- the request's headers and body ----------------------------------------------------------


def media_type(headers: Mapping[str, str]) -> str | None:
    raw = headers.get("content-type")
    return raw.split(";", 1)[0].strip().lower() if raw else None


def require_json(headers: Mapping[str, str]) -> None:
    media = media_type(headers)
    if media is None or media in JSON_TYPES or media.endswith("+json"):
        return
    hint = " (images go to POST /predict/image)" if media.startswith(("image/", "multipart/")) else ""
    raise ApiError(415, f"Content-Type {media!r} is not accepted here; send JSON with "
                        f"'Content-Type: application/json'{hint}")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body of a routed request; see :func:`read_limited`."""
    return await read_limited(request.receive, request.headers.get("content-length"), limit)


async def read_limited(receive: Receive, declared: str | None, limit: int) -> bytes:
    """The whole body from the ASGI ``receive``, or 413 as soon as it is known to exceed ``limit``
    (before reading it when declared). A plain loop over ``receive``, not Starlette's ``stream()``
    generator: this is on every request's path, and the generator's machinery cost more than the loop."""
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise ApiError(413, f"request body is {size} bytes, more than the limit of {limit} bytes "
                                "(FLUXO_MAX_BODY_BYTES); send fewer instances per request")
    received: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is more than the limit of {limit} bytes (FLUXO_MAX_BODY_BYTES); "
                                    "send fewer instances per request")
            received.append(chunk)
        if not message.get("more_body", False):
            return received[0] if len(received) == 1 else b"".join(received)


def parse_json(body: bytes) -> Any:
    """orjson for speed; on failure the standard parser, which reads NaN/Infinity so the validator can name them."""
    if not body.strip():
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as error:
        raise ApiError(400, f"the request body is not valid JSON ({error})") from None


# --- API key ---------------------------------------------------------------------------------

SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <FLUXO_API_KEY>"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "The key in FLUXO_API_KEY."},
}


def require_api_key(headers: Mapping[str, str], expected: str | None) -> None:
    """Prediction routes need the key when FLUXO_API_KEY is set (``expected``); compared in constant time.

    A plain call rather than a FastAPI dependency: dependency resolution cost
    about 5% of the CPU of a request (py-spy); the OpenAPI document declares it.
    """
    if expected is None:
        return
    given = headers.get("x-api-key")
    if given is None:
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        given = credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None
    challenge = {"WWW-Authenticate": "Bearer"}
    if given is None:
        raise ApiError(401, "this route needs an API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                       challenge)
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, "the API key is not valid", challenge)


# --- browsers and request ids ----------------------------------------------------------------


def refuse_cross_site(headers: Mapping[str, str]) -> None:
    """403 for a request a web page of another site sent: its ``Origin`` names that site.

    Why: without an API key, a server on a user's machine or intranet would answer any web page
    the user visits. A page can POST a multipart form or a body of a "simple" type without a CORS
    preflight, and so poison the payload log and the drift checks. Browsers send ``Origin`` with
    every cross-origin POST (and ``null`` from sandboxes and redirects); command-line and server
    clients send none, so they are unaffected, and a page served by this server itself
    (same scheme, host and port as ``Host``) still may call it.
    """
    origin = headers.get("origin")
    if origin is None:
        return
    host = (headers.get("host") or "").lower()
    if origin != "null" and host and origin.lower().partition("://")[2] == host:
        return
    raise ApiError(403, f"cross-site request refused: Origin {origin[:100]!r} is not this server "
                        f"({host[:100] or 'no Host header'}); call the API from a client outside the browser, or serve "
                        "the page from this server's address")


REQUEST_ID_LIMIT = 128


def client_request_id(headers: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(the client's ``X-Request-Id`` when usable, else None; why it was not, or None).

    Stored in the payload log and echoed in a header, so it is held to 1..128 visible ASCII
    characters (``!`` to ``~``): no control characters, no unbounded length.
    """
    given = headers.get("x-request-id")
    if not given:
        return None, None
    if len(given) > REQUEST_ID_LIMIT:
        return None, f"the X-Request-Id sent is longer than {REQUEST_ID_LIMIT} characters"
    if not (given.isascii() and given.isprintable()) or " " in given:
        return None, "the X-Request-Id sent holds characters other than visible ASCII"
    return given, None


# --- the OpenAPI document's account of the errors --------------------------------------------

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Malformed request: the message names the field, instance or element.",
        401: "Missing or wrong API key (only when FLUXO_API_KEY is set).",
        403: "Sent by a web page of another site (its Origin header); the API is not for cross-site pages.",
        413: "Body larger than FLUXO_MAX_BODY_BYTES, or more instances than FLUXO_MAX_INSTANCES.",
        415: "Wrong Content-Type, or an image that is not PNG/JPEG.",
        429: "The server is at FLUXO_MAX_CONCURRENCY requests; retry later.",
        504: "Not answered within FLUXO_TIMEOUT_S.",
    }.items()
}
"""What every prediction route may answer besides 200, for its ``responses=``."""
