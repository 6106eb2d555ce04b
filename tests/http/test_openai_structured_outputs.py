"""vLLM's structured_outputs and guided_* fields on /v1 (and the typed /chat) over the real tiny model:
each kind's output checked by an independent judge (re, jsonschema, the lark parser)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from asgi_app import openai_app, post
from structured_cases import ALIASES, CHOICES, KINDS, REGEX, SCHEMA, check_output, structured

from shardbento.api.protocol import ChatInput, chat_request
from shardbento.api.serving import Serving
from shardbento.errors import InvalidRequest

MODEL = "tiny-llama"
MESSAGES = [{"role": "user", "content": "Say something structured."}]


@pytest.fixture(scope="module")
def app(text_engine):
    return openai_app(text_engine)


def chat(app, **fields) -> httpx.Response:
    return post(app, "/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 60, **fields})


def complete(app, **fields) -> httpx.Response:
    return post(app, "/completions", {"model": MODEL, "prompt": "Answer:", "max_tokens": 60, **fields})


@pytest.mark.parametrize("kind", list(KINDS))
def test_structured_outputs_each_kind_on_chat_and_completions(app, kind: str) -> None:
    fields = structured(kind)
    answer = chat(app, **fields)
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    check_output(kind, choice["message"]["content"])
    sampled = complete(app, temperature=1.0, seed=11, **fields)
    assert sampled.status_code == 200, sampled.text
    assert sampled.json()["choices"][0]["finish_reason"] == "stop"
    check_output(kind, sampled.json()["choices"][0]["text"])


def test_structured_outputs_json_as_text_and_json_object(app) -> None:
    as_text = chat(app, structured_outputs={"json": json.dumps(SCHEMA)}).json()["choices"][0]["message"]
    as_object = chat(app, **structured("json")).json()["choices"][0]["message"]
    assert as_text["content"] == as_object["content"]
    anything = chat(app, max_tokens=120, structured_outputs={"json_object": True}).json()["choices"][0]
    if anything["finish_reason"] == "stop":
        assert isinstance(json.loads(anything["message"]["content"]), dict)


@pytest.mark.parametrize(("alias", "kind"), list(ALIASES.items()))
def test_structured_outputs_guided_aliases_equal_structured_outputs(app, alias: str, kind: str) -> None:
    expected = chat(app, **structured(kind)).json()["choices"][0]["message"]["content"]
    answer = chat(app, **{alias: KINDS[kind]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == expected
    check_output(kind, expected)
    assert complete(app, **{alias: KINDS[kind]}).status_code == 200


def test_structured_outputs_streamed_choice(app) -> None:
    response = chat(app, stream=True, structured_outputs={"choice": CHOICES})
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text in CHOICES
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_structured_outputs_typed_chat_takes_the_same_field(text_engine) -> None:
    serving = Serving(text_engine.spec)
    serving.attach(text_engine)
    body = ChatInput.model_validate({"messages": MESSAGES, "structured_outputs": {"regex": REGEX}})
    fields = {name: getattr(body, name) for name in ChatInput.model_fields if name != "messages"}
    request = chat_request(body.messages, fields, "req-typed", serving.settings.max_schema_bytes)
    completion = asyncio.run(serving.complete(request))
    assert completion.finish_reason == "stop"
    check_output("regex", completion.text)
    both = ChatInput.model_validate(
        {
            "messages": MESSAGES,
            "response_format": {"type": "json_object"},
            "structured_outputs": {"regex": REGEX},
        }
    )
    fields = {name: getattr(both, name) for name in ChatInput.model_fields if name != "messages"}
    with pytest.raises(InvalidRequest) as caught:
        chat_request(both.messages, fields, "req-typed", serving.settings.max_schema_bytes)
    assert caught.value.param == "structured_outputs.regex"


TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"grammar": "root ::= missing_rule"}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"grammar": "not a grammar {"}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"json": {"type": "objectx"}}}, "structured_outputs.json"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
        ({"structured_outputs": {"json": "[1, 2]"}}, "structured_outputs.json"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {"choice": ["a", 3]}}, "structured_outputs.choice[1]"),
        ({"structured_outputs": {"regex": "a" * 70_000}}, "structured_outputs.regex"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
        ({"structured_outputs": {"json_object": False}}, "structured_outputs.json_object"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs.regex"),
        (
            {"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}},
            "structured_outputs.choice",
        ),
        ({"structured_outputs": {"regex": "a"}, "guided_json": SCHEMA}, "guided_json"),
        ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_grammar": "root ::= missing_rule"}, "guided_grammar"),
        ({"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
        (
            {"structured_outputs": {"choice": ["a"]}, "tools": [TOOL], "tool_choice": "required"},
            "structured_outputs.choice",
        ),
    ],
)
def test_structured_outputs_bad_input_is_a_400_naming_the_field(app, fields: dict, param: str) -> None:
    response = chat(app, **fields)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.json()
    if "tools" not in fields:
        completion = complete(app, **fields)
        assert completion.status_code == 400 and completion.json()["error"]["param"] == param


def test_structured_outputs_text_format_and_auto_tools_are_no_second_constraint(app) -> None:
    fields = {"structured_outputs": {"choice": CHOICES}, "response_format": {"type": "text"}}
    assert chat(app, **fields).json()["choices"][0]["message"]["content"] in CHOICES
    with_tools = chat(app, structured_outputs={"choice": CHOICES}, tools=[TOOL], tool_choice="auto")
    assert with_tools.status_code == 200, with_tools.text
    assert with_tools.json()["choices"][0]["message"]["content"] in CHOICES
