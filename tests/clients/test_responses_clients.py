"""The Responses API (POST /v1/responses) with the client libraries unchanged against a real `bentoml
serve` of tiny-llama: the openai SDK (streamed and not, function tools, text.format), the OpenAI Agents
SDK's default model class (OpenAIResponsesModel) running a tool-calling agent (streamed and not), and
LangChain's ChatOpenAI(use_responses_api=True)."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import pytest
from pydantic import BaseModel

MODEL = "tiny-llama"
CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Rome"]}}, "required": ["city"]}
TOOLS = [{"type": "function", "name": "get_weather", "parameters": CITY}]


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    happy: bool


@pytest.fixture(scope="module")
def base_url(text_server) -> str:
    return f"{text_server.url}/v1"


@pytest.mark.parametrize("stream", [False, True])
def test_responses_openai_sdk_function_tool(base_url: str, stream: bool) -> None:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused")
    fields = {
        "model": MODEL,
        "input": "Weather?",
        "tools": TOOLS,
        "tool_choice": "required",
        "max_output_tokens": 60,
    }
    fields["parallel_tool_calls"] = False
    if stream:
        with client.responses.stream(**fields) as events:
            kinds = [event.type for event in events]
            response = events.get_final_response()
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    else:
        response = client.responses.create(**fields)
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] in ("Paris", "Oslo", "Rome")


def test_responses_openai_sdk_text_format_parse(base_url: str) -> None:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused")
    parsed = client.responses.parse(model=MODEL, input="A pet?", text_format=Pet, max_output_tokens=60)
    assert isinstance(parsed.output_parsed, Pet)
    streamed = client.responses.create(model=MODEL, input="Hi", max_output_tokens=6, stream=True)
    kinds = [event.type for event in streamed]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.incomplete"


@pytest.mark.parametrize("stream", [False, True])
def test_responses_agents_sdk_default_model_calls_a_tool(base_url: str, stream: bool) -> None:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIResponsesModel,
        Runner,
        ToolCallOutputItem,
        function_tool,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    calls: list[str] = []

    @function_tool
    def get_weather(city: Literal["Paris", "Oslo", "Rome"]) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    model = OpenAIResponsesModel(model=MODEL, openai_client=AsyncOpenAI(base_url=base_url, api_key="unused"))
    agent = Agent(
        name="forecaster",
        instructions="Use the tool, then answer.",
        tools=[get_weather],
        model=model,
        output_type=Pet,  # the answer after the tool's result is schema-bound, so it ends (a random model's
        # free text runs to max_tokens, an `incomplete` response the SDK raises on, as it should)
        model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, max_tokens=80),
    )

    async def run():  # Runner.run, or Runner.run_streamed read to its end (the model's stream events)
        if not stream:
            return await Runner.run(agent, "Weather in Oslo?", max_turns=4)
        streamed = Runner.run_streamed(agent, "Weather in Oslo?", max_turns=4)
        kinds = {event.type async for event in streamed.stream_events()}
        assert {"raw_response_event", "run_item_stream_event"} <= kinds
        return streamed

    result = asyncio.run(run())
    assert calls and calls[0] in ("Paris", "Oslo", "Rome")
    outputs = [item.output for item in result.new_items if isinstance(item, ToolCallOutputItem)]
    assert outputs[0] == f"sunny in {calls[0]}"
    assert isinstance(result.final_output, Pet)  # the turn after the tool's result, sent back as input items


def test_responses_langchain_use_responses_api(base_url: str) -> None:
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(
        model=MODEL,
        base_url=base_url,
        api_key="unused",
        use_responses_api=True,
        max_tokens=400,
        temperature=0,
    )
    message = model.invoke("Hello")
    assert isinstance(message.text if isinstance(message.text, str) else message.text(), str)
    bound = model.bind_tools([Pet], tool_choice="Pet", parallel_tool_calls=False)
    called = bound.invoke("A pet?")
    assert called.tool_calls and called.tool_calls[0]["name"] == "Pet"
    Pet(**called.tool_calls[0]["args"])
