"""Request ids in log lines: the current request's id travels in a context variable into every record."""

from __future__ import annotations

import logging
import uuid
from contextvars import ContextVar
from typing import Any

REQUEST_ID: ContextVar[str | None] = ContextVar("shardbento_request_id", default=None)


def new_http_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:24]}"


class _RequestIdRecordFactory:
    """Wraps the record factory: a record made while serving a request starts with `[<request id>]`.

    A factory rather than a handler filter because BentoML installs its own handlers and formats;
    this reaches every logger (ours, BentoML's, uvicorn's) without touching their configuration.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.inner(*args, **kwargs)
        request_id = REQUEST_ID.get()
        record.request_id = request_id or "-"
        if request_id and isinstance(record.msg, str) and request_id not in record.msg:
            record.msg = f"[{request_id}] {record.msg}"
        return record


def install_request_id_logging() -> None:
    """Idempotent: installing twice (two middlewares, a reload) wraps the factory once."""
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _RequestIdRecordFactory):
        logging.setLogRecordFactory(_RequestIdRecordFactory(factory))
