"""The middleware stack BentoML builds for the service: our timeout, and tracing without a span per chunk."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import bentoml
import httpx
import pytest
from bentoml._internal.server.http import traffic
from opentelemetry.instrumentation import asgi
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shardbento.api.middleware.stack import adjust_bentoml_stack
from shardbento.api.middleware.timeout import FirstByteTimeout

NUM_CHUNKS = 12


@pytest.fixture
def adjusted() -> Iterator[type]:
    """adjust_bentoml_stack() for one test, then BentoML's and OpenTelemetry's own classes back."""
    original_tracing, original_timeout = asgi.OpenTelemetryMiddleware, traffic.TimeoutMiddleware
    try:
        adjust_bentoml_stack()
        adjust_bentoml_stack()  # a second call changes nothing more
        yield original_tracing
    finally:
        asgi.OpenTelemetryMiddleware, traffic.TimeoutMiddleware = original_tracing, original_timeout


def layers(app: Any) -> list[Any]:
    found = []
    while app is not None and len(found) < 50:
        found.append(app)
        app = getattr(app, "app", None)
    return found


def test_middleware_stack_bentoml_builds_our_timeout_and_quiet_tracing(adjusted: type) -> None:
    @bentoml.service(name="stack-probe")
    class Probe:
        @bentoml.api
        def hello(self) -> str:
            return "hello"

    app = Probe.to_asgi(is_main=True)

    async def first_request() -> int:  # Starlette builds its middleware stack on the first request
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://probe"
        ) as client:
            return (await client.get("/livez")).status_code

    assert asyncio.run(first_request()) == 200
    stack = layers(app.middleware_stack)
    tracing = [layer for layer in stack if isinstance(layer, adjusted)]
    assert len(tracing) == 1 and tracing[0].exclude_send_span and not tracing[0].exclude_receive_span
    assert any(isinstance(layer, FirstByteTimeout) for layer in stack)
    assert asgi.OpenTelemetryMiddleware.__bases__ == (adjusted,)  # adjusting twice subclassed once


async def streaming(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    )
    for i in range(NUM_CHUNKS):
        await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def spans_of_one_stream(middleware: type) -> list[Any]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = middleware(streaming, tracer_provider=provider)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [],
        "query_string": b"",
        "server": ("127.0.0.1", 3000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "http_version": "1.1",
    }
    asyncio.run(app(scope, receive, send))
    assert len(sent) == NUM_CHUNKS + 2  # every message reached the client either way
    return list(exporter.get_finished_spans())


def test_middleware_stack_traces_a_stream_without_a_span_per_chunk(adjusted: type) -> None:
    own = spans_of_one_stream(adjusted)
    assert sum(span.name.endswith("http send") for span in own) >= NUM_CHUNKS  # what the change removes

    quiet = spans_of_one_stream(asgi.OpenTelemetryMiddleware)
    assert not [span.name for span in quiet if span.name.endswith("http send")]
    servers = [span for span in quiet if span.kind.name == "SERVER"]
    assert len(servers) == 1
    status = servers[0].attributes.get(
        "http.response.status_code", servers[0].attributes.get("http.status_code")
    )
    assert status == 200
    assert any(span.name.endswith("http receive") for span in quiet)
