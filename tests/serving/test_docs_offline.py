"""``GET /docs`` works offline: Swagger UI's files come from the app, never from a CDN.

In-process (httpx over ASGI, no server, no network): the page and every file it loads.
"""

from __future__ import annotations

import asyncio
import re
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from serving import ServingConfig
from serving.app import create_app
from serving.docs import STATIC_PATH
from serving.server import ModelServer
from tests.serving_fixtures import build_model_dir

BASE = "http://testserver"


class _Resources(HTMLParser):
    """The URLs a browser would fetch for the page: script sources and linked files."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href", "img": "src", "iframe": "src"}.get(tag)
        self.urls += [value for name, value in attrs if name == wanted and value]


def _page_urls(html: str) -> list[str]:
    """Tag URLs, plus the OpenAPI document the inline script hands to SwaggerUIBundle."""
    parser = _Resources()
    parser.feed(html)
    return parser.urls + re.findall(r"""\burl:\s*['"]([^'"]+)['"]""", html)


def _get_all(app, paths: list[str]) -> list[httpx.Response]:
    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
            return [await client.get(path) for path in paths]

    return asyncio.run(main())


@pytest.fixture
def app(tmp_path: Path):
    """The service's app over a tiny model, as a BentoML worker sets it up."""
    app = create_app()
    app.state.server = ModelServer(ServingConfig(model_dir=build_model_dir(tmp_path / "m"), provider="cpu"))
    yield app
    app.state.server.close()


def test_docs_page_loads_nothing_from_outside_the_server(app) -> None:
    (page,) = _get_all(app, ["/docs"])
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    outside = [u for u in re.findall(r"""https?://[^\s'"<>)]+""", page.text) if not u.startswith(BASE)]
    assert not outside, outside
    urls = _page_urls(page.text)
    assert {f"{STATIC_PATH}/swagger-ui-bundle.js", f"{STATIC_PATH}/swagger-ui.css", "/openapi.json"} <= set(urls)
    for url, response in zip(urls, _get_all(app, urls)):
        assert response.status_code == 200, url
        assert response.content, url
    bundle, css = _get_all(app, [f"{STATIC_PATH}/swagger-ui-bundle.js", f"{STATIC_PATH}/swagger-ui.css"])
    assert bundle.headers["content-type"].startswith("text/javascript") and b"SwaggerUIBundle" in bundle.content
    assert css.headers["content-type"].startswith("text/css")


def test_bundled_swagger_ui_renders_openapi_3_1(app) -> None:
    """FastAPI writes OpenAPI 3.1; swagger-ui before 5 shows "Unable to render this definition" for it."""
    spec, bundle = _get_all(app, ["/openapi.json", f"{STATIC_PATH}/swagger-ui-bundle.js"])
    assert spec.json()["openapi"].startswith("3.1")
    assert b"isOAS31" in bundle.content


def test_only_the_swagger_files_are_served(app) -> None:
    missing, source = _get_all(app, [f"{STATIC_PATH}/nope.js", f"{STATIC_PATH}/__init__.py"])
    assert missing.status_code == 404 and source.status_code == 404
    assert "error" in missing.json()
