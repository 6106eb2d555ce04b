"""GLM-4.5 on the vLLM engine beside the transformers engine, through the real /v1 app in-process, on
tiny-glm45 (GLM-4.5-Air's hub layout, template and tokens): vLLM's own GLM-4.5 model gives the same
greedy tokens from the same checkpoint (per-expert tensors, the multi-token-prediction layer left
unloaded), and reasoning split from a constrained answer and a forced call in GLM-4.5's key/value tags
(grammars naming the tag tokens, run by vLLM's guidance backend) come out the same on both."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from asgi_app import openai_app, post_async
from thinking_cases import WEATHER, WEATHER_TOOLS, think_bias

from shardbento.catalog import load_spec
from shardbento.engine import create_engine
from shardbento.engine.base import ChatMessage, SamplingParams
from shardbento.engine.vllm.engine import VLLMEngine

MODEL = "tiny-glm45"
MESSAGES = [{"role": "user", "content": "Weather in Oslo?"}]


@pytest.fixture(scope="module")
def engines(loop: asyncio.AbstractEventLoop) -> Iterator[dict[str, Any]]:
    """One vLLM engine for the module (it takes most of a minute to start) beside transformers."""
    hf = create_engine(load_spec(MODEL))
    vllm = VLLMEngine.load(load_spec(MODEL).model_copy(update={"engine": "vllm"}))
    try:
        yield {"transformers": (hf, openai_app(hf)), "vllm": (vllm, openai_app(vllm))}
    finally:
        vllm.close()
        hf.close()


def test_vllm_glm45_experts_greedy_tokens_equal_transformers(
    loop: asyncio.AbstractEventLoop, engines: dict[str, Any]
) -> None:
    async def collect(engine: Any) -> list[int]:
        prompt = engine.render_chat([ChatMessage(role="user", text="Count the shards of the model.")])
        params = SamplingParams(max_tokens=24, ignore_eos=True)
        return [t async for delta in engine.stream(prompt, params, "glm45") for t in delta.token_ids]

    hf, vllm = (loop.run_until_complete(collect(engine)) for engine, _ in engines.values())
    assert vllm == hf
    info = engines["vllm"][0].info
    assert (info.reasoning_parser, info.tool_parser) == ("glm45", "glm45")


def messages_of(loop: asyncio.AbstractEventLoop, engines: dict[str, Any], fields: dict) -> dict[str, dict]:
    result = {}
    for name, (engine, app) in engines.items():
        body = {
            "model": MODEL,
            "messages": MESSAGES,
            "frequency_penalty": 2.0,
            "logit_bias": think_bias(engine.tokenizer),
        }
        response = loop.run_until_complete(post_async(app, "/chat/completions", body | fields))
        assert response.status_code == 200, (name, response.text)
        result[name] = response.json()["choices"][0]
    return result


def test_vllm_glm45_reasoning_and_constrained_answer_equal_transformers(
    loop: asyncio.AbstractEventLoop, engines: dict[str, Any]
) -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}}
    choices = messages_of(loop, engines, {"max_tokens": 40, "response_format": schema})
    hf, vllm = choices["transformers"]["message"], choices["vllm"]["message"]
    assert hf["reasoning_content"] and set(hf["reasoning_content"].split()) == {"he"}
    assert json.loads(hf["content"])["city"] in ("Paris", "Oslo")
    assert (vllm["reasoning_content"], vllm["content"]) == (hf["reasoning_content"], hf["content"])


def test_vllm_glm45_forced_tool_call_equals_transformers(
    loop: asyncio.AbstractEventLoop, engines: dict[str, Any]
) -> None:
    fields = {
        "max_tokens": 100,
        "tools": WEATHER_TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }
    choices = messages_of(loop, engines, fields)
    calls = {}
    for name, choice in choices.items():
        assert choice["finish_reason"] == "tool_calls", (name, choice)
        ((call,),) = [choice["message"]["tool_calls"]]
        calls[name] = (call["function"]["name"], json.loads(call["function"]["arguments"]))
    assert calls["vllm"] == calls["transformers"]
    assert calls["vllm"][0] == "get_weather" and calls["vllm"][1]["city"] in ("Paris", "Oslo")
