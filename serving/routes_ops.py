"""Operations and documentation: ``/metrics``, ``/metadata``, ``/report`` and the OpenAPI document.

These routes answer operators and client authors, not prediction traffic: they touch no
batcher and are open without the API key, except ``/report``, which shows test samples. The OpenAPI document is FastAPI's plus what
FastAPI cannot see (the bodies the prediction handlers parse themselves, the key's
security schemes, the one model name this server answers to); ``/docs`` renders it
(serving/docs.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from starlette.responses import HTMLResponse, PlainTextResponse, Response

from serving.admission import METRICS_ROUTE
from serving.contract import REPORT_FILE
from serving.http import SECURITY_SCHEMES, ApiError, json_response, require_api_key
from serving.metrics import exposition, get_metrics
from serving.ops_pool import run_ops
from serving.rollout import CHALLENGER, CHAMPION, VARIANT_HEADER
from serving.schemas import ErrorResponse, MetadataResponse
from serving.server import ModelServer, server_of

# A report is a static page with inline styles and data: images; it may load nothing else and run nothing.
REPORT_HEADERS = {"Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'",
                  "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

router = APIRouter()


@router.get(METRICS_ROUTE, response_class=PlainTextResponse, tags=["operations"],
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}})
async def metrics() -> Response:
    """Prometheus metrics summed over the workers (serving/metrics.py lists them)."""
    await get_metrics().flush_all()  # every worker's counts of the requests answered before this scrape
    text, content_type = await run_ops(exposition)
    return Response(text, media_type=content_type)


@router.get("/metadata", response_model=MetadataResponse, tags=["model"])
async def metadata(request: Request) -> Response:
    """Model identity, data version, input contract, image recipe, test metrics, the provider in use,
    and the rollout (mode, shares, and the challenger's metadata or null)."""
    server = server_of(request)
    return json_response({**server.live.info, "rollout": server.rollout_info()})


@router.get("/report", response_class=HTMLResponse, tags=["model"],
            responses={200: {"content": {"text/html": {}}, "description": "The model report (self-contained HTML)."},
                       404: {"model": ErrorResponse, "description": "No report for this model or variant."},
                       400: {"model": ErrorResponse, "description": "Unknown variant."},
                       401: {"model": ErrorResponse, "description": "Missing or wrong API key (FLUXO_API_KEY set "
                                                                    "and FLUXO_REPORT_PUBLIC off)."}})
async def report(request: Request, variant: str = CHAMPION) -> Response:
    """The live model's report, written at export: test metrics with intervals, per-class table,
    confusion matrix, calibration, confident mistakes, parity, latency, data, learning curves and
    the comparison with the champion it replaced. ``?variant=challenger`` for the challenger's.
    It shows test samples, so with ``FLUXO_API_KEY`` set it needs the key unless ``FLUXO_REPORT_PUBLIC`` is on."""
    server = server_of(request)
    if not server.config.report_public:
        require_api_key(request.headers, server.config.api_key)
    return await _report(server, variant)


async def _report(server: ModelServer, variant: str) -> Response:
    if variant not in (CHAMPION, CHALLENGER):
        raise ApiError(400, f"variant={variant!r}: use {CHAMPION!r} (the default) or {CHALLENGER!r}")
    live = server.live if variant == CHAMPION else server.challenger
    if live is None:
        raise ApiError(404, "no challenger is loaded (FLUXO_ROLLOUT=champion); GET /report shows the champion's")
    path = live.model.model_dir / REPORT_FILE
    try:
        page = await run_ops(path.read_bytes)
    except FileNotFoundError:
        raise ApiError(404, f"{live.name} v{live.version or '?'} has no report: it was exported before fluxo wrote "
                            f"them; re-export its run with `fluxo export --run-id {live.info.get('run_id')}`") from None
    return Response(page, media_type="text/html; charset=utf-8", headers={**REPORT_HEADERS, VARIANT_HEADER: live.variant})


# --- the OpenAPI document ----------------------------------------------------------------------


def openapi_document(app: FastAPI, request_bodies: Mapping[str, dict[str, Any]],
                     body_schemas: Sequence[type[BaseModel]]) -> Callable[[], dict[str, Any]]:
    """``app.openapi``: FastAPI's document plus the request bodies the handlers parse themselves
    (for clients and schemathesis), built once.

    ``request_bodies`` maps each such POST path to its ``content``; ``body_schemas`` are the
    models those contents refer to, added as components.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in body_schemas:
                document = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(document.pop("$defs", {}))
                components[model.__name__] = document
            schema["components"]["securitySchemes"] = SECURITY_SCHEMES
            for path, content in request_bodies.items():
                operation = schema["paths"][path]["post"]
                operation["requestBody"] = {"required": True, "content": content}
                operation["security"] = [{"bearer": []}, {"apiKey": []}, {}]  # {}: when no key is configured
            # The report shows test samples: keyed like the prediction routes (FLUXO_REPORT_PUBLIC opens it).
            schema["paths"]["/report"]["get"]["security"] = [{"bearer": []}, {"apiKey": []}, {}]
            server: ModelServer | None = getattr(app.state, "server", None)
            if server is not None:
                _name_the_model(schema, server)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def _name_the_model(schema: dict[str, Any], server: ModelServer) -> None:
    """Path parameters limited to the one model name (and version) this server answers to."""
    live = server.live
    for operations in schema["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "model_name":
                    parameter["schema"] = {"type": "string", "enum": [live.name]}
                elif parameter["name"] == "model_version" and live.version is not None:
                    parameter["schema"] = {"type": "string", "enum": [live.version]}
