"""Reasoning split from the answer on the tiny thinking model (Qwen3-8B's template and tokens) through
the real app: whole and streamed chat answers, the template-opened block, constraints and tool calls
on the answer only, and reasoning items in /v1/responses.

The random model writes the tags only when pushed: logit_bias favours `<think>`, then " he", then
`</think>`, and frequency_penalty (2 per use) walks it from one to the next, so the output is
`<think> he he ... he</think>` and then the answer, every run the same.
"""

from __future__ import annotations

import json

import openai
import pytest
from asgi_app import openai_app, with_openai_client
from thinking_cases import streamed_split, think_bias

from shardbento.reasoning import Reasoning, split_reasoning
from shardbento.tiny.templates import QWEN3_CHAT_TEMPLATE

MODEL = "tiny-qwen3"
PET = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}}, "required": ["kind"]}
FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET}}
MESSAGES = [{"role": "user", "content": "A pet?"}]
CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": CITY}}]
# Qwen3's thinking-only releases (Qwen3-*-Thinking-2507) end the prompt inside the block they open.
OPENING_TEMPLATE = QWEN3_CHAT_TEMPLATE.replace(
    "    {{- '<|im_start|>assistant\\n' }}\n    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n",
    "    {{- '<|im_start|>assistant\\n<think>\\n' }}\n",
)


def load(spec):
    from shardbento.engine import create_engine

    engine = create_engine(spec)
    return engine, openai_app(engine)


@pytest.fixture(scope="module")
def qwen3():
    from shardbento.catalog import load_spec

    engine, app = load(load_spec(MODEL))
    yield engine, app
    engine.close()


@pytest.fixture(scope="module")
def opening():
    """tiny-qwen3 served with a template that opens the reasoning block in the prompt."""
    from shardbento.catalog import load_spec

    assert OPENING_TEMPLATE != QWEN3_CHAT_TEMPLATE
    engine, app = load(load_spec(MODEL).model_copy(update={"chat_template": OPENING_TEMPLATE}))
    yield engine, app
    engine.close()


def bias(engine, opens: bool = True) -> dict[str, float]:
    return think_bias(engine.tokenizer, opens)


run = with_openai_client


def chat(app, **fields):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 40, "frequency_penalty": 2.0, **fields}
    return run(app, lambda client: client.chat.completions.create(**body))


def chat_streamed(app, **fields) -> tuple[str, str, list]:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 40, "frequency_penalty": 2.0, **fields}
    return streamed_split(app, body)


def test_reasoning_split_whole_and_streamed_with_a_constrained_answer(qwen3) -> None:
    engine, app = qwen3
    response = chat(app, logit_bias=bias(engine), response_format=FORMAT)
    message = response.choices[0].message
    assert message.reasoning_content and set(message.reasoning_content.split()) == {"he"}
    assert message.reasoning == message.reasoning_content  # vLLM's newer name for the same text
    assert json.loads(message.content)["kind"] in ("cat", "dog")  # the schema held for the answer only
    assert response.choices[0].finish_reason == "stop"
    thought, content, _ = chat_streamed(app, logit_bias=bias(engine), response_format=FORMAT)
    assert (thought, content) == (message.reasoning_content, message.content)


def test_reasoning_block_opened_by_the_template(opening) -> None:
    """The output holds only `</think>`: what comes before it is reasoning, as the raw tokens show."""
    engine, app = opening
    response = chat(app, logit_bias=bias(engine, opens=False), logprobs=True, max_tokens=12)
    raw = "".join(t.token for t in response.choices[0].logprobs.content)
    assert "<think>" not in raw and "</think>" in raw
    message = response.choices[0].message
    assert (message.reasoning_content, message.content) == split_reasoning(raw, Reasoning("qwen3", True))
    assert message.reasoning_content == raw.split("</think>")[0].strip("\n")
    thought, content, _ = chat_streamed(app, logit_bias=bias(engine, opens=False), max_tokens=12)
    assert (thought, content) == (message.reasoning_content, message.content)


def test_reasoning_none_when_thinking_is_off(qwen3) -> None:
    _, app = qwen3
    response = chat(
        app, extra_body={"chat_template_kwargs": {"enable_thinking": False}}, max_tokens=6, logprobs=True
    )
    message = response.choices[0].message
    assert message.reasoning_content is None
    assert message.content == "".join(t.token for t in response.choices[0].logprobs.content)


def test_reasoning_tool_call_parsed_from_the_answer(qwen3) -> None:
    engine, app = qwen3
    response = chat(
        app,
        logit_bias=bias(engine),
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=100,
    )
    message = response.choices[0].message
    assert response.choices[0].finish_reason == "tool_calls"
    assert message.reasoning_content and "<tool_call>" not in message.reasoning_content
    assert message.content is None and json.loads(message.tool_calls[0].function.arguments)["city"]
    _, _, chunks = chat_streamed(
        app,
        logit_bias=bias(engine),
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=100,
    )
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert calls[0][0].function.name == "get_weather"


def test_reasoning_tool_markers_in_the_reasoning_are_not_calls(opening) -> None:
    engine, app = opening
    tokenizer = engine.tokenizer
    tool_call, end = tokenizer.convert_tokens_to_ids(["<tool_call>", "</think>"])
    response = chat(app, logit_bias={str(tool_call): 30, str(end): 25}, tools=TOOLS, max_tokens=6)
    message = response.choices[0].message
    assert "<tool_call>" in message.reasoning_content
    assert not message.tool_calls


def test_reasoning_effort_is_a_template_variable_of_thinking_models(qwen3, app_without_reasoning) -> None:
    _, app = qwen3
    assert chat(app, reasoning_effort="low", max_tokens=2).choices[0].finish_reason == "length"

    async def refused(client):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model="tiny-llama", messages=MESSAGES, max_tokens=2, reasoning_effort="low"
            )
        return caught.value

    assert run(app_without_reasoning, refused).body["param"] == "reasoning_effort"


@pytest.fixture(scope="module")
def app_without_reasoning(text_engine):
    return openai_app(text_engine)


def test_reasoning_item_in_responses_whole_and_streamed(opening) -> None:
    _, app = opening
    body = {
        "model": MODEL,
        "input": "A pet?",
        "max_output_tokens": 10,
        "text": {"format": {"type": "json_object"}},
    }
    response = run(app, lambda client: client.responses.create(**body))
    assert [item.type for item in response.output] == ["reasoning", "message"]
    reasoning = response.output[0].content[0].text
    assert response.status == "incomplete"  # the random model never closed its block within 10 tokens
    assert response.usage.output_tokens_details.reasoning_tokens == response.usage.output_tokens == 10

    async def scenario(client):
        async with client.responses.stream(**body) as stream:
            kinds = [event.type async for event in stream]
        return kinds, stream

    async def streamed(client):
        stream = await client.responses.create(stream=True, **body)
        return [event async for event in stream]

    events = run(app, streamed)
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == reasoning
    assert "response.reasoning_text.done" in kinds and kinds[-1] == "response.incomplete"
    assert [e.sequence_number for e in events] == list(range(len(events)))
