"""The OpenAI-compatible /v1 ASGI app: one-line routes and its one exception-to-error-shape mapping."""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from shardbento.api.errors import error_response
from shardbento.api.image_urls import ImageFetchConfig
from shardbento.api.openai.serving import OpenAIServing, Result
from shardbento.api.serving import Serving
from shardbento.errors import InvalidRequest, NotReady, ShardbentoError, error_body, status_type

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def attach_serving(app: Starlette, serving: Serving, images: ImageFetchConfig | None = None) -> None:
    """Give the app the service's Serving (one model, one request path); called when the service starts."""
    app.state.openai = OpenAIServing(serving, images or ImageFetchConfig.from_env())


def _openai(request: Request) -> OpenAIServing:
    handler = getattr(request.app.state, "openai", None)
    if handler is None:
        raise NotReady("the service is starting; retry shortly")
    return handler


async def _body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError:
        raise InvalidRequest("the request body is not valid JSON") from None


def _respond(result: Result) -> Response:
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
    return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)


async def chat_completions(request: Request) -> Response:
    return _respond(await _openai(request).chat(await _body(request)))


async def completions(request: Request) -> Response:
    return _respond(await _openai(request).completion(await _body(request)))


async def models(request: Request) -> Response:
    return _respond(_openai(request).models())


async def _typed_error(request: Request, exc: ShardbentoError) -> Response:
    return error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(error_body(message, status_type(exc.status_code)), status_code=exc.status_code)


async def _unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return JSONResponse(error_body("internal server error", "server_error"), status_code=500)


def create_openai_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/chat/completions", chat_completions, methods=["POST"]),
            Route("/completions", completions, methods=["POST"]),
            Route("/models", models, methods=["GET"]),
        ],
        exception_handlers={
            ShardbentoError: _typed_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
    )
