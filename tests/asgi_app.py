"""The /v1 app in this process over an engine, and the clients that call it without a socket
(httpx.ASGITransport): the tests of the HTTP layer that need a real model but no server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from shardbento.api.image_urls import ImageFetchConfig
from shardbento.api.openai.routes import attach_serving, create_openai_app
from shardbento.api.serving import Serving

BASE_URL = "http://test"


def openai_app(engine: Any) -> Any:
    """The /v1 app serving `engine` as the service would (its Serving, the default image settings)."""
    serving = Serving(engine.spec)
    serving.attach(engine)
    app = create_openai_app()
    attach_serving(app, serving, ImageFetchConfig())
    return app


async def _with_client(app: Any, scenario: Callable[..., Awaitable[Any]], with_http: bool) -> Any:
    import openai

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=120) as http:
        client = openai.AsyncOpenAI(api_key="unused", base_url=BASE_URL, http_client=http, max_retries=0)
        return await (scenario(client, http) if with_http else scenario(client))


def with_openai_client(app: Any, scenario: Callable[..., Awaitable[Any]], with_http: bool = False) -> Any:
    """Runs `scenario(client)` (or `scenario(client, http)`) with the openai SDK's async client on `app`."""
    return asyncio.run(_with_client(app, scenario, with_http))


async def post_async(app: Any, path: str, body: dict) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        return await client.post(path, json=body, timeout=120)


def post(app: Any, path: str, body: dict) -> httpx.Response:
    """A JSON POST to `app`, answered in full."""
    return asyncio.run(post_async(app, path, body))
