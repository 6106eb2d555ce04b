"""One place that turns exceptions and BentoML's own error bodies into OpenAI's error shape."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any

from starlette.responses import JSONResponse

from shardbento.errors import ShardbentoError, error_body, status_type

logger = logging.getLogger(__name__)

Message = dict[str, Any]
ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def error_response(exc: ShardbentoError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


def typed_errors(func: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Wrap a coroutine API so a ShardbentoError becomes its response (BentoML would make it a 500)."""

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await func(*args, **kwargs)
        except ShardbentoError as exc:
            return error_response(exc)

    return wrapper


def typed_stream_errors(func: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """Wrap an async-generator API: BentoML primes the first chunk and maps a BentoMLException's
    status, so a ShardbentoError travels as one carrying our error body (reshape() unpacks it)."""
    from bentoml.exceptions import BentoMLException

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        try:
            async for item in func(*args, **kwargs):
                yield item
        except ShardbentoError as exc:
            raise BentoMLException(json.dumps(exc.body()), error_code=HTTPStatus(exc.status)) from exc

    return wrapper


def reshape(status: int, body: bytes) -> bytes:
    """BentoML's `{"error": ..., "detail": [...]}` (or a list of it) in OpenAI's shape; ours pass."""
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        data = {"error": body.decode(errors="replace")}
    if isinstance(data, list) and data:
        data = data[0]
    if isinstance(data, dict) and isinstance(data.get("error"), str) and data["error"].startswith('{"error"'):
        data = json.loads(data["error"])  # a ShardbentoError carried through BentoML by typed_stream_errors
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return json.dumps(data).encode()
    message, param = _message_and_param(data, status)
    return json.dumps(error_body(message, status_type(status), param, None)).encode()


def _message_and_param(data: Any, status: int) -> tuple[str, str | None]:
    if not isinstance(data, dict):
        return str(data), None
    details = data.get("detail")
    if isinstance(details, list) and details and isinstance(details[0], dict):
        first = details[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        problems = "; ".join(f"{'.'.join(map(str, d.get('loc', ())))}: {d.get('msg')}" for d in details)
        return f"invalid request: {problems}", param
    message = data.get("error") or data.get("detail") or f"HTTP {status}"
    return str(message), None


class ErrorShapeMiddleware:
    """Every error leaves in OpenAI's shape, including one raised before a stream's first chunk.

    The response start is held until the first body chunk, so an async-generator API that fails
    validation before producing anything answers with its 4xx instead of a 200 and a cut stream.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sender = _HeldSender(send)
        try:
            await self.app(scope, receive, sender)
        except ShardbentoError as exc:
            await sender.fail(exc.status, exc.body(), exc.headers())
        except Exception:
            logger.exception("unhandled error on %s", scope.get("path"))
            await sender.fail(500, error_body("internal server error", "server_error"), {})


class _HeldSender:
    def __init__(self, send: Any) -> None:
        self._send = send
        self._start: Message | None = None
        self._sent_start = False
        self._error_chunks: list[bytes] | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._start = message
            if message["status"] >= 400 and _is_json(message):
                self._error_chunks = []
            return
        if message["type"] != "http.response.body" or self._start is None:
            await self._send(message)
            return
        if self._error_chunks is not None:
            self._error_chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                await self._send_error(
                    self._start["status"], reshape(self._start["status"], b"".join(self._error_chunks))
                )
            return
        if not self._sent_start:
            self._sent_start = True
            await self._send(self._start)
        await self._send(message)

    async def _send_error(self, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
        kept = [(k, v) for k, v in (self._start or {}).get("headers", []) if k.lower() == b"retry-after"]
        if status in (429, 503) and not kept and not extra:
            kept = [(b"retry-after", b"5")]
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *kept,
        ]
        headers += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
        self._sent_start = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})

    async def fail(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        if self._sent_start:  # the stream already started: it ends here, the client sees it cut
            logger.warning("stream ended by an error after it started (status %d)", status)
            return
        await self._send_error(status, json.dumps(body).encode(), headers)


def _is_json(start: Message) -> bool:
    for key, value in start.get("headers", []):
        if key.lower() == b"content-type":
            return b"json" in value
    return False
