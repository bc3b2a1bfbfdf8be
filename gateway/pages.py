"""The gateway's pages for people: `/docs`, Swagger UI over /openapi.json (its files from
the swagger-ui-bundle package: nothing is fetched from another host), `/status`, the
performance guide's table live from /status.json (status.py), and `/`, which leads to /docs."""

from __future__ import annotations

import pathlib
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Route
from swagger_ui_bundle import swagger_ui_path

from gateway.status import StatusBoard

STATIC = pathlib.Path(__file__).parent / "static"
SWAGGER_UI = pathlib.Path(str(swagger_ui_path))
# The API's policy (hardening.py) forbids everything; a page needs its own scripts, styles
# and calls, from this origin only (Swagger UI styles inline and draws data: images).
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'"
)


def page_routes(status: StatusBoard) -> list[Route]:
    files = {
        "/docs": STATIC / "docs.html",
        "/docs/docs.js": STATIC / "docs.js",
        "/docs/swagger-ui.css": SWAGGER_UI / "swagger-ui.css",
        "/docs/swagger-ui-bundle.js": SWAGGER_UI / "swagger-ui-bundle.js",
        "/status": STATIC / "status.html",
        "/status/status.js": STATIC / "status.js",
    }
    return [
        Route("/", _to_docs, methods=["GET"]),
        *(Route(path, _file(file), methods=["GET"]) for path, file in files.items()),
        Route("/status.json", status.endpoint, methods=["GET"]),
    ]


async def _to_docs(request: Request) -> Response:
    return RedirectResponse("/docs")


def _file(path: pathlib.Path) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return FileResponse(path, headers={"content-security-policy": PAGE_POLICY})

    return endpoint
