"""traffic.timeout's middleware: nothing of a finished request outlives it; a late response is a 504."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import weakref
from typing import Any

from bentoml._internal.server.http import traffic

from shardbento.api.middleware.timeout import FirstByteTimeout, replace_bentoml_timeout

REQUEST_STATE: contextvars.ContextVar[object] = contextvars.ContextVar("request_state")


class RequestState:
    """Stands for what a request's context carries (its tracing span, its id)."""


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


async def call(app: Any, path: str = "/") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "path": path, "method": "GET", "headers": []}, receive, send)
    return sent


def served_in_own_context(app: Any) -> weakref.ref[RequestState]:
    """One request served the way an outer middleware (OpenTelemetry's) runs it: state in a context var."""
    state = RequestState()

    async def one() -> None:
        REQUEST_STATE.set(state)
        sent = await call(app)
        assert sent[-1]["body"] == b"hello"

    loop = asyncio.get_running_loop()
    loop.create_task(one(), context=contextvars.Context())
    return weakref.ref(state)


def test_timeout_middleware_keeps_nothing_of_a_finished_request() -> None:
    """BentoML 1.4's own middleware fails this: its timer holds each request's context for `timeout` s."""

    async def scenario() -> tuple[bool, int]:
        app = FirstByteTimeout(hello, timeout=600)
        loop = asyncio.get_running_loop()
        before = sum(not h.cancelled() for h in loop._scheduled)  # type: ignore[attr-defined]
        refs = [served_in_own_context(app) for _ in range(50)]
        for _ in range(100):  # let the tasks finish; bounded
            await asyncio.sleep(0)
            if all(ref() is None for ref in refs):
                break
        gc.collect()
        armed = sum(not h.cancelled() for h in loop._scheduled) - before  # type: ignore[attr-defined]
        return all(ref() is None for ref in refs), armed

    freed, armed = asyncio.run(scenario())
    assert freed, "a finished request's context is still referenced"
    assert armed == 0, f"{armed} timers still armed after every request finished"


def test_timeout_middleware_answers_504_in_the_error_shape_and_cancels_the_app() -> None:
    async def scenario() -> tuple[list[dict[str, Any]], bool]:
        stopped = asyncio.Event()

        async def never(scope: dict[str, Any], receive: Any, send: Any) -> None:
            try:
                await asyncio.Event().wait()
            finally:
                stopped.set()

        sent = await call(FirstByteTimeout(never, timeout=0.05), "/v1/chat/completions")
        await asyncio.wait_for(stopped.wait(), timeout=10)
        return sent, stopped.is_set()

    sent, stopped = asyncio.run(scenario())
    assert sent[0]["status"] == 504
    error = json.loads(sent[1]["body"])["error"]
    assert error["code"] == "response_timeout" and "0.05 seconds" in error["message"]
    assert stopped


def test_timeout_middleware_replaces_bentomls_in_the_apps_it_builds() -> None:
    from bentoml._internal.server.base_app import BaseAppFactory

    original = traffic.TimeoutMiddleware
    try:
        replace_bentoml_timeout()

        class Factory(BaseAppFactory):
            name = "probe"

        classes = [m.cls for m in Factory(timeout=600).middlewares]
        assert FirstByteTimeout in classes and original not in classes
    finally:
        traffic.TimeoutMiddleware = original
