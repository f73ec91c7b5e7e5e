"""``GET /docs``: Swagger UI from files installed with the service, not from a CDN.

FastAPI's own page loads swagger-ui from cdn.jsdelivr.net (and its favicon from
fastapi.tiangolo.com), so on a host without internet it is blank. The same page is
built here with its three files served by the app under ``/docs/static/``, from the
``fastapi-swagger`` package: it ships swagger-ui 5, which renders the OpenAPI 3.1
document FastAPI writes (``swagger-ui-bundle`` ships 4.15, which refuses 3.1).
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, HTMLResponse

logger = logging.getLogger(__name__)

DOCS_PATH = "/docs"
STATIC_PATH = f"{DOCS_PATH}/static"
ASSETS = {  # the only files served: the package directory holds other things too
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}
CACHE = "public, max-age=86400"  # the files change only with the installed package


def assets_dir() -> Path | None:
    """Where the installed swagger-ui files are, or None without ``fastapi-swagger``."""
    try:
        folder = Path(str(resources.files("fastapi_swagger") / "resources"))
    except ModuleNotFoundError:
        return None
    return folder if all((folder / name).is_file() for name in ASSETS) else None


def add_docs(app: FastAPI) -> None:
    """Serve Swagger UI at ``/docs`` from the installed files (the app is built with ``docs_url=None``).

    Without them (an environment installed before the dependency), fall back to
    FastAPI's CDN page rather than no docs at all, and say so.
    """
    folder = assets_dir()
    if folder is None:
        logger.warning("fastapi-swagger is not installed: /docs loads Swagger UI from a CDN")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get(DOCS_PATH, include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        local = {} if folder is None else {
            "swagger_js_url": f"{root}{STATIC_PATH}/swagger-ui-bundle.js",
            "swagger_css_url": f"{root}{STATIC_PATH}/swagger-ui.css",
            "swagger_favicon_url": f"{root}{STATIC_PATH}/favicon-32x32.png",
        }
        return get_swagger_ui_html(openapi_url=f"{root}{openapi_url}", title=f"{app.title} - Swagger UI",
                                   swagger_ui_parameters=app.swagger_ui_parameters, **local)

    @app.get(f"{STATIC_PATH}/{{name}}", include_in_schema=False)
    async def docs_asset(name: str) -> FileResponse:
        if folder is None or name not in ASSETS:
            raise HTTPException(404, f"no such file: {STATIC_PATH}/{name}")
        return FileResponse(folder / name, media_type=ASSETS[name], headers={"Cache-Control": CACHE})
