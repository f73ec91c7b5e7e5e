"""The HTTP API: a FastAPI app assembled from the routers, the error handlers and request accounting.

Three ways in, one model run and one answer:

- ``POST /predict``: JSON ``{"instances": [...]}``, each instance shaped like the input;
- ``POST /predict/image``: PNG/JPEG files (multipart/form-data, or one raw ``image/png``
  / ``image/jpeg`` body), preprocessed by the recipe in metadata.json;
- ``POST /v2/models/{model_name}/infer``: the Open Inference Protocol, plus its
  ``/v2``, ``/v2/health/*`` and ``/v2/models/{model_name}[/ready]`` routes.

Every client mistake answers 4xx with ``{"error": ...}``. BentoML (serving/service.py)
mounts this app and adds what it already does well: the timeout (504), ``/healthz``,
``/livez`` and ``/readyz``; the concurrency limit (429) and ``/metrics`` are this app's.
The app works without BentoML too (tests drive it in-process). serving/README.md has the
table of which module holds what.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from serving import routes_ops, routes_predict, routes_v2
from serving.admission import RequestAccounting
from serving.docs import add_docs
from serving.http import ApiError
from serving.lifespan import lifespan


def create_app() -> FastAPI:
    """The API; ``app.state.server`` must hold a :class:`serving.server.ModelServer` before requests arrive."""
    app = FastAPI(
        title="fluxo",
        summary="Predictions from the champion model, on ONNX Runtime.",
        version="1",
        docs_url=None,  # serving/docs.py: the same page, without a CDN
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
    )
    app.add_middleware(RequestAccounting)
    add_docs(app)
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    # In this order: the OpenAPI document lists the paths as the routes were added.
    for router in (routes_predict.router, routes_ops.router, routes_v2.router):
        _add_routes(app, router)
    app.openapi = routes_ops.openapi_document(  # type: ignore[method-assign]
        app,
        {**routes_predict.REQUEST_BODIES, **routes_v2.REQUEST_BODIES},
        (*routes_predict.BODY_SCHEMAS, *routes_v2.BODY_SCHEMAS),
    )
    return app


def _add_routes(app: FastAPI, router: APIRouter) -> None:
    """``router``'s routes onto the app itself, as if declared on it.

    Not ``include_router``: FastAPI 0.150 keeps an included router as a route group that every
    request is matched through, 15 µs more CPU per request in-process (GET /v2/health/live: 42
    against 57 µs), on routes whose whole handler costs less. These routers set no prefix,
    dependency or default that including would apply, and nothing here uses
    ``app.dependency_overrides``, which routes declared on a router do not consult.
    """
    app.router.routes.extend(router.routes)


async def _api_error(_: Request, error: ApiError) -> Response:
    return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)


async def _http_error(_: Request, error: HTTPException) -> Response:
    return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)


async def _validation_error(_: Request, error: RequestValidationError) -> Response:
    first = error.errors()[0] if error.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=400)
