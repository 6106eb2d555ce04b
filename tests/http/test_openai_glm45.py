"""GLM-4.5 through the real app on its tiny counterpart (GLM-4.5-Air's layout, template and tokens):
reasoning split from the answer, tool calls in its key/value format parsed and forced by grammar,
thinking turned off by the template's own switch, earlier calls and results rendered back into the
prompt, and the mixture of experts served the same over two tensor-parallel ranks.

The random model writes the tags only when pushed: logit_bias favours `<think>` (which the answer's
grammar allows once), then " he", then `</think>`, and frequency_penalty (2 per use) walks it from
" he" to the end of the block.
"""

from __future__ import annotations

import json

import openai
import pytest
from asgi_app import openai_app, with_openai_client
from thinking_cases import WEATHER, WEATHER_TOOLS, streamed_split, think_bias

from shardbento.engine.base import ChatMessage, ToolCall

MODEL = "tiny-glm45"
MESSAGES = [{"role": "user", "content": "Weather in Oslo?"}]
TOOLS = WEATHER_TOOLS
FORMAT = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}}
run = with_openai_client


def load(name: str):
    from shardbento.catalog import load_spec
    from shardbento.engine import create_engine

    engine = create_engine(load_spec(name))
    return engine, openai_app(engine)


@pytest.fixture(scope="module")
def glm45():
    engine, app = load(MODEL)
    yield engine, app
    engine.close()


def bias(engine) -> dict[str, float]:
    return think_bias(engine.tokenizer)


def chat(app, model: str = MODEL, **fields):
    body = {"model": model, "messages": MESSAGES, "max_tokens": 40, "frequency_penalty": 2.0, **fields}
    return run(app, lambda client: client.chat.completions.create(**body))


def chat_streamed(app, **fields) -> tuple[str, str, list]:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 40, "frequency_penalty": 2.0, **fields}
    return streamed_split(app, body)


def test_glm45_reasoning_split_whole_and_streamed(glm45) -> None:
    engine, app = glm45
    assert (engine.info.reasoning_parser, engine.info.tool_parser) == ("glm45", "glm45")  # from the template
    response = chat(app, logit_bias=bias(engine), logprobs=True, response_format=FORMAT)
    message = response.choices[0].message
    raw = "".join(t.token for t in response.choices[0].logprobs.content)
    assert raw.lstrip("\n").startswith("<think>") and "</think>" in raw
    assert message.reasoning_content and set(message.reasoning_content.split()) == {"he"}
    assert json.loads(message.content)["city"] in ("Paris", "Oslo")  # the schema held for the answer only
    thought, content, _ = chat_streamed(app, logit_bias=bias(engine), response_format=FORMAT)
    assert (thought, content) == (message.reasoning_content, message.content)


def test_glm45_thinking_off_closes_the_block_in_the_prompt(glm45) -> None:
    engine, app = glm45
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    prompt = engine.render_chat([ChatMessage(role="user", text="Hi")], off["chat_template_kwargs"])
    assert engine.decode(list(prompt.token_ids)).endswith("/nothink<|assistant|>\n<think></think>")
    response = chat(app, extra_body=off, max_tokens=6, logprobs=True)
    message = response.choices[0].message
    assert message.reasoning_content is None
    assert message.content == "".join(t.token for t in response.choices[0].logprobs.content)
    forced = chat(app, extra_body=off, tools=TOOLS, tool_choice="required", max_tokens=60, logprobs=True)
    raw = "".join(t.token for t in forced.choices[0].logprobs.content)
    assert raw.lstrip("\n").startswith("<tool_call>get_weather")  # no block after the prompt's empty one
    assert (
        forced.choices[0].finish_reason == "tool_calls"
        and forced.choices[0].message.reasoning_content is None
    )


def test_glm45_forced_tool_call_in_its_key_value_format(glm45) -> None:
    """tool_choice required: the grammar names GLM-4.5's tag tokens, the model may reason first, and
    the call parses into arguments its schema accepts; streamed, the same call arrives as deltas."""
    engine, app = glm45
    forced = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 100}
    response = chat(app, logit_bias=bias(engine), **forced)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.reasoning_content and "<tool_call>" not in choice.message.reasoning_content
    (call,) = choice.message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and arguments["city"] in ("Paris", "Oslo")
    assert isinstance(arguments["days"], int) and 1 <= arguments["days"] <= 3
    _, _, chunks = chat_streamed(app, logit_bias=bias(engine), **forced)
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert calls[0][0].function.name == "get_weather"


def test_glm45_forced_call_no_value_satisfies_is_a_400(glm45) -> None:
    _, app = glm45
    never = {"type": "object", "properties": {"city": {"type": "string", "enum": []}}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": never}}]
    with pytest.raises(openai.BadRequestError) as caught:
        chat(app, tools=tools, tool_choice="required")
    assert caught.value.body["param"] == "tool_choice"


def test_glm45_earlier_call_and_result_render_into_the_prompt(glm45) -> None:
    """An assistant turn's call (arguments as JSON text, as clients send them) and the tool's answer:
    the template reads the arguments as a mapping and writes them in its key/value tags."""
    engine, app = glm45
    arguments = '{"city": "Oslo", "days": 2}'
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    history = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "cold"},
    ]
    response = chat(app, messages=history, tools=TOOLS, max_tokens=4, logprobs=True)
    assert response.usage.completion_tokens == len(response.choices[0].logprobs.content)
    messages = [
        ChatMessage(role="user", text=MESSAGES[0]["content"]),
        ChatMessage(role="assistant", text="", tool_calls=(ToolCall("call_1", "get_weather", arguments),)),
        ChatMessage(role="tool", text="cold", tool_call_id="call_1"),
    ]
    text = engine.decode(list(engine.render_chat(messages, {"tools": TOOLS}).token_ids))
    assert "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n" in text
    assert "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call><|observation|>" in text
    assert text.endswith("<tool_response>\ncold\n</tool_response><|assistant|>")
    assert response.usage.prompt_tokens == len(engine.encode(text).token_ids)


def test_glm45_experts_over_two_tensor_parallel_ranks_answer_as_one_process(glm45) -> None:
    _, app = glm45
    engine, tp_app = load("tiny-glm45-tp2")
    try:
        assert engine.info.parallel.startswith("tensor")
        fields = {"temperature": 0.0, "max_tokens": 24, "frequency_penalty": 0.0}
        one, two = chat(app, **fields), chat(tp_app, model="tiny-glm45-tp2", **fields)
        assert one.choices[0].message.content == two.choices[0].message.content
        assert one.usage.completion_tokens == two.usage.completion_tokens == 24 or (
            one.choices[0].finish_reason == two.choices[0].finish_reason == "stop"
        )
    finally:
        engine.close()
