"""One place that turns exceptions and BentoML's own error bodies into OpenAI's error shape.

`as_error` is the one mapping from an exception to what the client sees; the typed APIs, the /v1 app,
SSE error events and the outermost middleware all go through it.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from shardbento.api.disconnect import CLIENT_CLOSED_REQUEST, ClientGone
from shardbento.errors import HTTPError, InternalError, ShardbentoError, error_body, status_type

logger = logging.getLogger(__name__)

Message = dict[str, Any]
ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


# The typed error behind a stream that failed before its first chunk, for ErrorShapeMiddleware: BentoML
# answers such a failure itself, from a BentoMLException's status and message alone.
_FAILED_STREAM: contextvars.ContextVar[list[ShardbentoError] | None] = contextvars.ContextVar(
    "shardbento_failed_stream", default=None
)


def as_error(exc: BaseException, where: str = "") -> ShardbentoError:
    """What the client sees for `exc`: our typed errors as they are, an HTTP error by its status, anything
    else an internal error (logged here with its traceback, never shown)."""
    if isinstance(exc, ShardbentoError):
        return exc
    if isinstance(exc, HTTPException):
        return HTTPError(f"{where}: {exc.detail}" if where else str(exc.detail), status=exc.status_code)
    logger.error("unhandled error%s", f" on {where}" if where else "", exc_info=exc)
    return InternalError("internal server error")


def error_response(exc: BaseException, where: str = "") -> JSONResponse:
    error = as_error(exc, where)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def typed_errors(func: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Wrap a coroutine API so a ShardbentoError becomes its response (BentoML would make it a 500)."""

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await func(*args, **kwargs)
        except ShardbentoError as exc:
            return error_response(exc)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)

    return wrapper


def typed_stream_errors(func: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """Wrap an async-generator API: BentoML primes the first chunk and answers a failure there from a
    BentoMLException's status; the typed error itself is handed to ErrorShapeMiddleware beside it."""
    from bentoml.exceptions import BentoMLException

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        try:
            async for item in func(*args, **kwargs):
                yield item
        except ClientGone:
            return  # nobody reads the answer
        except ShardbentoError as exc:
            failed = _FAILED_STREAM.get()
            if failed is not None:
                failed.append(exc)
            raise BentoMLException(exc.message, error_code=HTTPStatus(exc.status)) from exc

    return wrapper


def reshape(status: int, body: bytes) -> bytes:
    """BentoML's `{"error": ..., "detail": [...]}` (or a list of it) in OpenAI's shape; ours pass."""
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        data = {"error": body.decode(errors="replace")}
    if isinstance(data, list) and data:
        data = data[0]
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
        failed: list[ShardbentoError] = []
        token = _FAILED_STREAM.set(failed)
        sender = _HeldSender(send, failed)
        try:
            await self.app(scope, receive, sender)
        except Exception as exc:  # noqa: BLE001 - every error leaves in the one shape
            error = as_error(exc, scope.get("path", ""))
            await sender.fail(error.status, error.body(), error.headers())
        finally:
            _FAILED_STREAM.reset(token)


class _HeldSender:
    def __init__(self, send: Any, failed: list[ShardbentoError]) -> None:
        self._send = send
        self._failed = failed  # a typed stream's error, when BentoML answered it
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
                if self._failed:
                    error = self._failed[-1]
                    await self._send_error(error.status, json.dumps(error.body()).encode(), error.headers())
                    return
                status = self._start["status"]
                await self._send_error(status, reshape(status, b"".join(self._error_chunks)))
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
