"""/v1 with the openai SDK in-process over the real tiny model: response_format, tools, n, echo."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from asgi_app import openai_app, with_openai_client
from pydantic import BaseModel, Field

MESSAGES = [{"role": "user", "content": "Tell me about a pet."}]
CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}}, "required": ["city"]}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": CITY},
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"hour24": {"type": "boolean"}},
                "required": ["hour24"],
            },
        },
    },
]


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)
    happy: bool


@pytest.fixture(scope="module")
def app(text_engine):
    return openai_app(text_engine)


with_client = with_openai_client


def create(app, **fields):
    body = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 60, **fields}
    return with_client(app, lambda client: client.chat.completions.create(**body))


def test_openai_structured_parse_returns_the_pydantic_model(app) -> None:
    async def scenario(client):
        return await client.chat.completions.parse(
            model="tiny-llama", messages=MESSAGES, response_format=Pet, max_tokens=60, temperature=1.0, seed=5
        )

    response = with_client(app, scenario)
    assert isinstance(response.choices[0].message.parsed, Pet)
    assert response.choices[0].finish_reason == "stop"


def test_openai_structured_json_schema_and_json_object(app) -> None:
    schema = {**Pet.model_json_schema(), "additionalProperties": False}  # else extra keys, free strings
    response = create(
        app, response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": schema}}
    )
    assert response.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(response.choices[0].message.content), schema)
    response = create(app, response_format={"type": "json_object"}, max_tokens=120)
    if response.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(response.choices[0].message.content), dict)
    assert create(app, response_format={"type": "text"}, max_tokens=4).choices[0].message.content is not None


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_openai_structured_forced_tool_call_parses(app, choice) -> None:
    response = create(app, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False)
    message = response.choices[0].message
    assert response.choices[0].finish_reason == "tool_calls"
    assert len(message.tool_calls) == 1 and message.content is None
    call = message.tool_calls[0]
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    assert call.id.startswith("call_")


def test_openai_structured_streamed_tool_call_sends_openai_deltas(app) -> None:
    async def scenario(client):
        stream = await client.chat.completions.create(
            model="tiny-llama",
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            parallel_tool_calls=False,
            max_tokens=60,
            stream=True,
        )
        return [chunk async for chunk in stream]

    chunks = with_client(app, scenario)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert deltas[0].role == "assistant"
    assert calls[0].id and calls[0].function.name == "get_weather" and calls[0].index == 0
    arguments = "".join(c.function.arguments or "" for c in calls)
    assert json.loads(arguments)["city"] in ("Paris", "Rome", "Oslo")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(d.content for d in deltas)


def test_openai_structured_auto_without_a_call_is_content(app) -> None:
    response = create(app, tools=TOOLS, max_tokens=8)
    choice = response.choices[0]
    assert choice.message.tool_calls is None or choice.message.tool_calls == []
    assert choice.finish_reason in ("stop", "length") and choice.message.content


def test_openai_structured_agent_second_turn_renders_the_call_and_its_result(app, text_engine) -> None:
    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_7",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_7", "content": "light snow"},
        {"role": "developer", "content": "Answer in one word."},
    ]
    response = create(app, messages=history, tools=TOOLS, max_tokens=6)
    assert response.choices[0].message.content is not None

    # the rendered prompt holds the earlier call and its result, as the template writes them
    from shardbento.engine.base import ChatMessage, ToolCall

    rendered = text_engine._prompts.chat_text(
        [
            ChatMessage("user", "Tell me about a pet."),
            ChatMessage("assistant", "", tool_calls=(ToolCall("call_7", "get_weather", '{"city": "Oslo"}'),)),
            ChatMessage("tool", "light snow", tool_call_id="call_7"),
        ]
    )
    assert '"name": "get_weather", "arguments": {"city": "Oslo"}' in rendered
    assert "<tool_response>\nlight snow\n</tool_response>" in rendered


def test_openai_structured_n_choices(app) -> None:
    response = create(app, n=3, max_tokens=6, temperature=1.0, seed=9, extra_body={"ignore_eos": True})
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert len({c.message.content for c in response.choices}) > 1  # seeds move per choice
    again = create(app, n=3, max_tokens=6, temperature=1.0, seed=9, extra_body={"ignore_eos": True})
    assert [c.message.content for c in again.choices] == [c.message.content for c in response.choices]
    assert response.usage.completion_tokens == 18
    greedy = create(app, n=2, max_tokens=6)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_openai_structured_n_streams_every_index(app) -> None:
    async def scenario(client):
        stream = await client.chat.completions.create(
            model="tiny-llama",
            messages=MESSAGES,
            n=2,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        return [chunk async for chunk in stream]

    chunks = with_client(app, scenario)
    finished = {
        c.choices[0].index: c.choices[0].finish_reason
        for c in chunks
        if c.choices and c.choices[0].finish_reason
    }
    assert finished == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == 10


def test_openai_structured_echo_prepends_the_prompt(app) -> None:
    async def scenario(client):
        plain = await client.completions.create(model="tiny-llama", prompt="Hello there", max_tokens=4)
        echoed = await client.completions.create(
            model="tiny-llama", prompt="Hello there", max_tokens=4, echo=True
        )
        return plain, echoed

    plain, echoed = with_client(app, scenario)
    assert echoed.choices[0].text == "Hello there" + plain.choices[0].text


def tool_with(parameters: dict) -> dict:
    """A tool whose parameters no call format can read (every parser takes them as an object schema)."""
    return {"type": "function", "function": {"name": "f", "parameters": {"type": "object", **parameters}}}


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"messages": [*MESSAGES, {"role": "tool", "tool_call_id": "zz", "content": "x"}]},
            "messages[1].tool_call_id",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objectx"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"enum": ["a" * 70000]}},
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"n": 9}, "n"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": "[1]"},
                            }
                        ],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1]"),
        ({"tools": [tool_with({"properties": [1]})]}, "tools[0].function.parameters.properties"),
        ({"tools": [tool_with({"properties": {"a": 5}})]}, "tools[0].function.parameters.properties"),
        ({"tools": [tool_with({"required": "a"})]}, "tools[0].function.parameters.required"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": "hi",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": "{}"},
                            }
                        ],
                    }
                ]
            },
            "messages[0].tool_calls",
        ),
    ],
)
def test_openai_structured_bad_input_is_a_400_naming_the_field(app, fields, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        create(app, **fields)
    assert caught.value.body["param"] == param, caught.value.body


def test_openai_structured_continuous_usage_counts_on_every_chunk(app) -> None:
    body = {
        "model": "tiny-llama",
        "messages": MESSAGES,
        "max_tokens": 5,
        "extra_body": {"ignore_eos": True},
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }

    async def scenario(client):
        stream = await client.chat.completions.create(**body)
        return [chunk async for chunk in stream]

    chunks = with_client(app, scenario)
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counts == sorted(counts) and counts[-1] == 5 and all(c.usage for c in chunks)
