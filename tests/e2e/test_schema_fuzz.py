"""Property-based fuzzing of the OpenAPI schemas (typed APIs and /v1) with schemathesis, bounded in time.

Asserted: no 5xx and every documented response matches its schema. Bodies that would be valid get
a small max_tokens so a generated case costs a fraction of a second on a CPU runner, not a minute.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

MAX_EXAMPLES = 20
FUZZ_MAX_TOKENS = 4
CHECKS = [not_a_server_error, response_schema_conformance]
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


def v1_openapi() -> dict[str, Any]:
    """/v1 is a mounted Starlette app with no schema of its own: built from its wire models."""
    from pydantic.json_schema import models_json_schema

    from shardbento.api.openai.endpoints_protocol import ModelList
    from shardbento.api.openai.protocol import (
        ChatCompletion,
        ChatCompletionRequest,
        CompletionRequest,
        TextCompletion,
    )

    models = [ChatCompletionRequest, CompletionRequest, ChatCompletion, TextCompletion, ModelList]
    _, schemas = models_json_schema(
        [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
    )

    from shardbento.api.serving import ROLES

    defs = schemas["$defs"]
    for definition in defs.values():  # `Any` fields the server accepts only as null (it rejects the rest)
        for name, field in definition.get("properties", {}).items():
            if not set(field) - {"title", "default"}:
                definition["properties"][name] = {"type": "null"}
    defs["ChatMessageIn"]["properties"]["role"] = {"enum": list(ROLES)}  # Serving checks the role

    def ref(model: type) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    def post(request: type, response: type) -> dict[str, Any]:
        return {
            "post": {
                "requestBody": {"required": True, "content": {"application/json": {"schema": ref(request)}}},
                "responses": {
                    "200": {"description": "ok", "content": {"application/json": {"schema": ref(response)}}}
                },
            }
        }

    paths = {
        "/v1/chat/completions": post(ChatCompletionRequest, ChatCompletion),
        "/v1/completions": post(CompletionRequest, TextCompletion),
        "/v1/models": {
            "get": {
                "responses": {
                    "200": {"description": "ok", "content": {"application/json": {"schema": ref(ModelList)}}}
                }
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "shardbento /v1", "version": "1"},
        "paths": paths,
        "components": {"schemas": defs},
    }


@pytest.fixture(scope="module")
def typed_schema(guarded_server):
    server, config = guarded_server
    headers = {"authorization": f"Bearer {config.api_key}"}
    document = httpx.get(f"{server.url}/docs.json", headers=headers, timeout=30).json()
    # BentoML labels the document OpenAPI 3.0 but fills it with pydantic v2's JSON Schema (numeric
    # exclusiveMinimum and the like), which is OpenAPI 3.1; say so, or the 3.0 validator rejects it.
    return schemathesis.openapi.from_dict({**document, "openapi": "3.1.0", "servers": [{"url": server.url}]})


@pytest.fixture(scope="module")
def v1_schema(guarded_server):
    server, _ = guarded_server
    return schemathesis.openapi.from_dict({**v1_openapi(), "servers": [{"url": server.url}]})


def _bounded(case: Any) -> None:
    """Cap the work a case asks for; the stream flag is dropped because the schema documents JSON answers."""
    if not isinstance(case.body, dict):
        return
    for field, cap in (("max_tokens", FUZZ_MAX_TOKENS), ("max_completion_tokens", FUZZ_MAX_TOKENS), ("n", 2)):
        value = case.body.get(field)
        if isinstance(value, int) and not isinstance(value, bool):
            case.body[field] = min(value, cap)
    case.body.setdefault("max_tokens", FUZZ_MAX_TOKENS)
    if "model" in case.body:  # the served name, or nearly every /v1 case stops at the 404 for the model
        case.body["model"] = "tiny-llama"
    case.body.pop("stream", None)


def _fuzz(case: Any, guarded_server: Any) -> int:
    server, config = guarded_server
    _bounded(case)
    headers = {"authorization": f"Bearer {config.api_key}"}
    response = case.call_and_validate(base_url=server.url, headers=headers, checks=CHECKS, timeout=120)
    return response.status_code


def _fuzz_operations(schema: Any, guarded_server: Any) -> dict[str, Counter]:
    """Each operation fuzzed by its own Hypothesis run (driven directly: schemathesis' pytest plugin
    does not load under pytest 9)."""
    fuzzed: dict[str, Counter] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        statuses = fuzzed.setdefault(operation.label, Counter())

        @given(case=operation.as_strategy())
        @FUZZ_SETTINGS
        def run(case: Any) -> None:
            statuses[_fuzz(case, guarded_server)] += 1  # noqa: B023 - run() is called in this iteration

        run()
    return fuzzed


def test_fuzz_typed_apis_no_5xx_and_schema_conformant(typed_schema, guarded_server) -> None:
    fuzzed = _fuzz_operations(typed_schema, guarded_server)
    assert any("/chat" in label for label in fuzzed), fuzzed
    assert any(statuses[200] for statuses in fuzzed.values()), fuzzed  # some cases reached the model


def test_fuzz_v1_no_5xx_and_schema_conformant(v1_schema, guarded_server) -> None:
    fuzzed = _fuzz_operations(v1_schema, guarded_server)
    assert len(fuzzed) == 3, fuzzed
    assert fuzzed["POST /v1/chat/completions"][200] or fuzzed["POST /v1/completions"][200], fuzzed
