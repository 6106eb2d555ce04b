"""Root endpoints that OpenAI-compatible tooling asks first: GET /health (200 once serving), GET /version."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shardbento import __version__
from shardbento.api.errors import error_response
from shardbento.api.serving import Serving
from shardbento.errors import NotReady


def attach(app: Starlette, serving: Serving) -> None:
    app.state.serving = serving


async def _health(request: Request) -> Response:
    """200 with an empty body, as vLLM answers, once requests are served; else the 503 they would get."""
    serving: Serving | None = getattr(request.app.state, "serving", None)
    if serving is None:
        return error_response(NotReady("the service is starting; retry shortly"))
    try:
        serving.ready_engine()
    except NotReady as exc:
        return error_response(exc)
    return JSONResponse({})


async def _version(request: Request) -> Response:
    return JSONResponse({"version": __version__})


def create_root_app() -> Starlette:
    """Mounted at the service's root: BentoML's mount only takes the paths these routes match."""
    return Starlette(
        routes=[Route("/health", _health, methods=["GET"]), Route("/version", _version, methods=["GET"])]
    )
