"""Cheap guards that run before a request's body is read: request ids, body size, requests in flight."""

from __future__ import annotations

import logging
from typing import Any

from shardbento.api.errors import ASGIApp, error_response
from shardbento.errors import Overloaded, PayloadTooLarge, ShardbentoError
from shardbento.logs import REQUEST_ID, install_request_id_logging, new_http_request_id
from shardbento.settings import Settings

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = b"x-request-id"
DRAIN_LIMIT_BYTES = 256 * 1024  # a refused body up to this size is read and dropped, not left unread


async def reject_unread(exc: ShardbentoError, scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answer a request refused before it was parsed. A small body is read and dropped first (bytes,
    no parsing): a socket closed with unread data is reset, and the client would see a connection
    error instead of this answer. A larger one is left unread and the connection closed after."""
    response = error_response(exc)
    if not await _drained(scope, receive):
        response.headers["connection"] = "close"
    await response(scope, receive, send)


async def _drained(scope: dict[str, Any], receive: Any) -> bool:
    declared = _content_length(scope)
    if declared is not None and declared > DRAIN_LIMIT_BYTES:
        return False
    received = 0
    while received <= DRAIN_LIMIT_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return False
        received += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return False


class RequestIdMiddleware:
    """Gives every HTTP request an id: in the `X-Request-Id` response header and in its log lines."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        install_request_id_logging()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_http_request_id()
        token = REQUEST_ID.set(request_id)

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (REQUEST_ID_HEADER, request_id.encode())],
                }
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


class BodySizeLimit:
    """413 for a body over SHARDBENTO_MAX_BODY_BYTES: at once from Content-Length, else while it streams in."""

    def __init__(self, app: ASGIApp, settings: Settings | None = None) -> None:
        self.app = app
        self.max_bytes = (settings or Settings.from_env()).max_body_bytes

    def _too_large(self, size: int) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body is {size} bytes or more; the limit is {self.max_bytes} bytes "
            "(SHARDBENTO_MAX_BODY_BYTES)",
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await reject_unread(self._too_large(declared), scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large(received)
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except PayloadTooLarge as exc:
            if started:
                raise
            await reject_unread(exc, scope, receive, send)


class InFlightLimit:
    """At most `max_in_flight` generating requests at once (running or queued); the next gets a 429.

    Decided from a counter before the body is read, so an overloaded server spends nothing on
    parsing, image decoding or tokenization. A slot is held until the response ends or the client
    goes away (a cancelled stream frees it at once). The engine scheduler may refuse earlier with
    its own 429; this bound is the backstop for every engine.
    """

    def __init__(self, app: ASGIApp, max_in_flight: int, retry_after_s: int = 1) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.retry_after_s = retry_after_s
        self.in_flight = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            logger.info("overloaded: %d requests in flight, limit %d", self.in_flight, self.max_in_flight)
            overloaded = Overloaded(
                f"the server is at its limit of {self.max_in_flight} requests in flight; "
                f"retry after {self.retry_after_s} s",
                retry_after_s=self.retry_after_s,
            )
            await reject_unread(overloaded, scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def _content_length(scope: dict[str, Any]) -> int | None:
    for key, value in scope.get("headers", []):
        if key.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
