"""The browser playground: a static page (no build step) mounted at /ui, talking to the typed APIs."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from shardbento.errors import error_body

STATIC_DIR = Path(__file__).resolve().parent / "static"
FILES = {
    "": ("playground.html", "text/html; charset=utf-8"),
    "playground.js": ("playground.js", "text/javascript; charset=utf-8"),
    "playground.css": ("playground.css", "text/css; charset=utf-8"),
}
# Paths an API-key check should leave open: the page is static and holds no secret; it sends the key
# (typed into the page, kept in sessionStorage) on every API call it makes.
PUBLIC_PATHS = frozenset({"/ui", "/ui/", *(f"/ui/{name}" for name in FILES if name)})
# The page only talks to its own origin and shows the user's images as blob: previews.
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
}


async def _file(request: Request) -> Response:
    entry = FILES.get(request.path_params.get("name", ""))
    if entry is None:
        body = error_body(f"no playground file {request.url.path}", "invalid_request_error")
        return JSONResponse(body, status_code=404)
    name, media_type = entry
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=HEADERS)


def create_ui_app() -> Starlette:
    """The playground app; the service mounts it with `@bentoml.asgi_app(ui_app, path="/ui")`."""
    routes = [Route("/", _file, methods=["GET", "HEAD"]), Route("/{name}", _file, methods=["GET", "HEAD"])]
    return Starlette(routes=routes)


ui_app = create_ui_app()
