"""POST /v1/responses with the openai SDK in-process over the real tiny model: whole and streamed
answers, function tools, text.format, multi-turn input items, and the refusals of a stateless server."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from asgi_app import openai_app, with_openai_client

MODEL = "tiny-llama"
CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}}, "required": ["city"]}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather now", "parameters": CITY}]
PET = {
    "type": "object",
    "properties": {"kind": {"enum": ["cat", "dog"]}, "age": {"type": "integer", "minimum": 0, "maximum": 30}},
    "required": ["kind", "age"],
}


@pytest.fixture(scope="module")
def app(text_engine):
    return openai_app(text_engine)


run = with_openai_client


def create(app, **fields):
    return run(app, lambda client: client.responses.create(**{"model": MODEL, **fields}))


def test_responses_greedy_answer_equals_chat_completions(app) -> None:
    response = create(
        app, input="Tell me about a pet.", instructions="Be brief.", max_output_tokens=12, temperature=0
    )
    chat = run(
        app,
        lambda client: client.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Tell me about a pet."},
            ],
            max_tokens=12,
            temperature=0,
        ),
    )
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens == 12
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.id.startswith("resp") and response.object == "response"
    assert [item.type for item in response.output] == ["message"]


def test_responses_stream_events_in_order_and_same_text(app) -> None:
    async def scenario(client):
        stream = await client.responses.create(
            model=MODEL, input="Hi there", max_output_tokens=8, stream=True
        )
        return [event async for event in stream]

    events = run(app, scenario)
    kinds = [e.type for e in events]
    assert kinds[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    whole = create(app, input="Hi there", max_output_tokens=8)
    assert deltas == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == 8


@pytest.mark.parametrize("stream", [False, True])
def test_responses_forced_function_call(app, stream: bool) -> None:
    fields = {
        "input": "Weather?",
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_output_tokens": 60,
    }

    async def scenario(client):
        if not stream:
            return await client.responses.create(model=MODEL, **fields)
        async with client.responses.stream(model=MODEL, **fields) as events:
            kinds = [event.type async for event in events]
            final = await events.get_final_response()
        assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
        return final

    response = run(app, scenario)
    assert response.status == "completed"
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), CITY)


def test_responses_text_format_json_schema_and_json_object(app) -> None:
    fmt = {"type": "json_schema", "name": "pet", "schema": PET, "strict": True}
    response = create(app, input="A pet?", text={"format": fmt}, max_output_tokens=60)
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), PET)
    assert response.text.format.type == "json_schema"
    response = create(app, input="JSON?", text={"format": {"type": "json_object"}}, max_output_tokens=120)
    if response.status == "completed":
        assert isinstance(json.loads(response.output_text), dict)


def test_responses_input_items_carry_earlier_calls_and_their_outputs(app) -> None:
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo?"}]},
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city": "Oslo"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    response = create(app, input=items, tools=TOOLS, max_output_tokens=5, metadata={"run": "7"}, user="u1")
    assert response.status in ("completed", "incomplete")
    assert response.metadata == {"run": "7"} and response.user == "u1"
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    chat_tools = [{"type": "function", "function": {k: v for k, v in TOOLS[0].items() if k != "type"}}]
    chat = run(
        app,
        lambda c: c.chat.completions.create(
            model=MODEL, messages=messages, tools=chat_tools, max_tokens=5, temperature=0
        ),
    )
    assert response.usage.input_tokens == chat.usage.prompt_tokens  # the same prompt was rendered


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": TOOLS, "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"reasoning": {"effort": "low"}}, "reasoning_effort"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"background": True}, "background"),
        ({"truncation": "auto"}, "truncation"),
        ({"unknown_field": 1}, "unknown_field"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0]",
        ),
        (
            {"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]},
            "messages[0].tool_call_id",
        ),
        (
            {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]},
            "input[0].arguments",
        ),
        ({"model": "other"}, "model"),
    ],
)
def test_responses_refusals_name_the_field(app, fields: dict, param: str) -> None:
    known = {"model": MODEL, "input": "Hi", **{k: v for k, v in fields.items() if k != "unknown_field"}}
    extra = {k: v for k, v in fields.items() if k == "unknown_field"}

    async def scenario(client):
        with pytest.raises(openai.APIStatusError) as caught:
            await client.responses.create(**known, extra_body=extra or None)
        return caught.value

    error = run(app, scenario)
    assert error.status_code in (400, 404)
    assert error.body["param"] == param, error.body


def test_responses_store_false_is_accepted(app) -> None:
    assert create(app, input="Hi", store=False, max_output_tokens=2).status == "incomplete"
