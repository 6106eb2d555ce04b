"""BentoML's /docs.json documents its own error body; this rewrites it to the OpenAI shape we send."""

from __future__ import annotations

import json
from typing import Any

from shardbento.api.errors import ASGIApp

DOCS_PATH = "/docs.json"
# The component schemas BentoML's generator puts under every API's 400/404/500 responses.
BENTOML_ERROR_SCHEMAS = ("InvalidArgument", "NotFound", "InternalServerError")
OPENAI_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Error",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def with_openai_errors(document: dict[str, Any]) -> dict[str, Any]:
    schemas = document.get("components", {}).get("schemas", {})
    for name in BENTOML_ERROR_SCHEMAS:
        if name in schemas:
            schemas[name] = OPENAI_ERROR_SCHEMA
    return document


class OpenAPIErrorShapeMiddleware:
    """Only GET /docs.json is touched: its body is buffered, patched, and sent with a new length."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") != DOCS_PATH or scope.get("method") != "GET":
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def buffered(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            if start.get("status") == 200:
                body = json.dumps(with_openai_errors(json.loads(body))).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, buffered)
