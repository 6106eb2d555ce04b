"""Typed errors a client can see: status, OpenAI type and code, JSON body (api.errors maps the rest)."""

from __future__ import annotations

from typing import Any, ClassVar


class ShardbentoError(Exception):
    """An error a client should see: a status, a message, and the parameter at fault."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(ShardbentoError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ShardbentoError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class ModelNotFound(ShardbentoError):
    status = 404
    type = "invalid_request_error"
    default_code = "model_not_found"


class PayloadTooLarge(ShardbentoError):
    status = 413
    type = "invalid_request_error"
    default_code = "payload_too_large"


class RequestTimeout(ShardbentoError):
    status = 408
    type = "invalid_request_error"
    default_code = "request_timeout"


class Overloaded(ShardbentoError):
    status = 429
    type = "rate_limit_error"
    default_code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class NotReady(ShardbentoError):
    status = 503
    type = "service_unavailable"
    default_code = "model_not_ready"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class HTTPError(ShardbentoError):
    """An HTTP-level refusal raised outside our code (no such route, wrong method): its status as given."""

    def __init__(self, message: str, *, status: int, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.status = status  # type: ignore[misc]
        self.type = status_type(status)  # type: ignore[misc]


class InternalError(ShardbentoError):
    """Anything unexpected: a 500 whose message says nothing of the internals."""

    status = 500
    type = "server_error"


class GenerationFailed(ShardbentoError):
    status = 500
    type = "server_error"
    default_code = "generation_failed"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def status_type(status: int) -> str:
    """The OpenAI error `type` for a bare HTTP status (errors raised outside our code)."""
    if status == 401:
        return Unauthorized.type
    if status == 429:
        return Overloaded.type
    if status == 503:
        return NotReady.type
    return "invalid_request_error" if status < 500 else "server_error"
