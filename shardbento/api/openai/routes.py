"""The OpenAI-compatible /v1 app and vLLM's root endpoints: one-line routes; errors via api.errors."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from shardbento import __version__
from shardbento.api.disconnect import CLIENT_CLOSED_REQUEST, ClientGone, unless_client_leaves
from shardbento.api.errors import error_response
from shardbento.api.image_urls import ImageFetchConfig
from shardbento.api.openai.responses import ResponsesServing
from shardbento.api.openai.serving import OpenAIServing, Result
from shardbento.api.serving import Serving
from shardbento.errors import InvalidRequest, NotReady, ShardbentoError

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def attach_serving(app: Starlette, serving: Serving, images: ImageFetchConfig | None = None) -> None:
    """Give the app the service's Serving (one model, one request path); called when the service starts."""
    images = images or ImageFetchConfig.from_env()
    app.state.openai = OpenAIServing(serving, images)
    app.state.responses = ResponsesServing(serving, images)


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


async def _generate(request: Request, work: Callable[[Any], Awaitable[Result]]) -> Response:
    """`work` on the request's body, cancelled if the client disconnects before its answer is ready."""
    body = await _body(request)
    try:
        return _respond(await unless_client_leaves(request.receive, work(body)))
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED_REQUEST)


async def chat_completions(request: Request) -> Response:
    return await _generate(request, _openai(request).chat)


async def responses(request: Request) -> Response:
    _openai(request)  # a 503 while the service starts, as the other routes answer
    return await _generate(request, request.app.state.responses.create)


async def completions(request: Request) -> Response:
    return await _generate(request, _openai(request).completion)


async def models(request: Request) -> Response:
    return _respond(_openai(request).models())


async def model(request: Request) -> Response:
    return _respond(_openai(request).model(request.path_params["model_id"]))


async def load_lora_adapter(request: Request) -> Response:
    return PlainTextResponse(await _openai(request).load_lora_adapter(await _body(request)))


async def unload_lora_adapter(request: Request) -> Response:
    return PlainTextResponse(await _openai(request).unload_lora_adapter(await _body(request)))


async def _error(request: Request, exc: Exception) -> Response:
    return error_response(exc, f"{request.method} {request.url.path}")


# ShardbentoError and HTTPException are answered where they are raised; a handler for Exception runs in
# Starlette's outermost middleware, which re-raises after answering.
EXCEPTION_HANDLERS: dict[Any, Any] = {ShardbentoError: _error, HTTPException: _error, Exception: _error}


async def tokenize(request: Request) -> Response:
    return _respond(await _openai(request).tokenize(await _body(request)))


async def detokenize(request: Request) -> Response:
    return _respond(await _openai(request).detokenize(await _body(request)))


async def health(request: Request) -> Response:
    """200 with an empty body, as vLLM answers, once requests are served; else the 503 they would get."""
    _openai(request).serving.ready_engine()
    return JSONResponse({})


async def version(request: Request) -> Response:
    return JSONResponse({"version": __version__})


def create_root_app() -> Starlette:
    """What vLLM serves beside /v1, mounted at the service's root: BentoML's passive mount takes only
    the paths these routes match, so the typed APIs and probes are untouched."""
    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/version", version, methods=["GET"]),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/detokenize", detokenize, methods=["POST"]),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
    )


def create_openai_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/chat/completions", chat_completions, methods=["POST"]),
            Route("/completions", completions, methods=["POST"]),
            Route("/responses", responses, methods=["POST"]),
            Route("/models", models, methods=["GET"]),
            Route("/models/{model_id:path}", model, methods=["GET"]),
            Route("/load_lora_adapter", load_lora_adapter, methods=["POST"]),
            Route("/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
    )
