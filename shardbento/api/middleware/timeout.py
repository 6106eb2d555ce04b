"""`traffic.timeout` as BentoML means it (a response must start within it), with its timer cancelled.

BentoML 1.4's own TimeoutMiddleware arms `loop.call_later(timeout, ...)` for every request and never
cancels it. The timer handle holds the request's context (its OpenTelemetry span, the request id) until
it fires: with `timeout: 600` each request's state outlives it by ten minutes, and the worker's resident
memory grows with traffic (about 6 KB a request). This one cancels the timer as soon as the response
starts or the request ends, and answers a timeout in the OpenAI error shape.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any

from shardbento.api.errors import ASGIApp, error_response
from shardbento.errors import ShardbentoError

logger = logging.getLogger(__name__)


class ResponseTimeout(ShardbentoError):
    status = 504
    type = "timeout"
    default_code = "response_timeout"


class FirstByteTimeout:
    """Cancels a request whose response has not started within `timeout` seconds (then a 504)."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        started = loop.create_future()
        # An empty context: the timer must not keep the request's state alive, even for a moment.
        timer = loop.call_later(self.timeout, _expire, started, context=contextvars.Context())

        async def send_started(message: dict[str, Any]) -> None:
            if not started.done():
                started.set_result(None)
                timer.cancel()
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, send_started))
        try:
            await asyncio.wait({started, task}, return_when=asyncio.FIRST_COMPLETED)
            if started.done() and started.exception() is not None and not task.done():
                task.cancel()
                logger.warning("no response started within %s s: %s cancelled", self.timeout, scope["path"])
                await error_response(
                    ResponseTimeout(f"Not able to process the request in {self.timeout:g} seconds")
                )(scope, receive, send)
                return
            await task
        finally:
            timer.cancel()
            if not task.done():  # this coroutine itself was cancelled: take the app down with it
                task.cancel()
            if not started.done():
                started.cancel()


def _expire(started: asyncio.Future[None]) -> None:
    if not started.done():
        started.set_exception(TimeoutError())


def replace_bentoml_timeout() -> None:
    """Make BentoML build its apps with FirstByteTimeout (its factories import the class by name from
    this module each time they build an app, so the swap must happen before the server starts)."""
    from bentoml._internal.server.http import traffic

    if traffic.TimeoutMiddleware is not FirstByteTimeout:
        traffic.TimeoutMiddleware = FirstByteTimeout  # type: ignore[misc,assignment]
