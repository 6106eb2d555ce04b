"""The client libraries applications are built on, unchanged, against a real `bentoml serve` of tiny-llama,
once with the transformers engine and once with the vLLM engine (that server runs from .venv-vllm).

The model has random weights, so every schema here is bounded (enums, ranged integers, booleans):
free strings would run to max_tokens. What is asserted is what the libraries do with our answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field
from servers import REPO, serve

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "vllm"))
from vllm_helpers import vllm_serve_env  # noqa: E402

MODEL = "tiny-llama"
VLLM_BENTOML = Path(os.environ.get("SHARDBENTO_TEST_VLLM_BENTOML", REPO / ".venv-vllm" / "bin" / "bentoml"))


class Pet(BaseModel):
    """A pet."""

    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)
    happy: bool


class Weather(BaseModel):
    """The weather in a city."""

    city: Literal["Paris", "Oslo", "Rome"]


@pytest.fixture(scope="module", params=["transformers", "vllm"])
def server(request: pytest.FixtureRequest, log_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    if request.param == "transformers":
        yield request.getfixturevalue("text_server")
        return
    if not VLLM_BENTOML.exists():
        pytest.skip(f"the vLLM engine's venv is missing ({VLLM_BENTOML}): make vllm-setup")
    env = vllm_serve_env(tmp_path_factory, MODEL)
    with serve(MODEL, log_dir, env=env, bentoml=VLLM_BENTOML, ready_timeout_s=300) as running:
        yield running


@pytest.fixture(scope="module")
def base_url(server) -> str:
    return f"{server.url}/v1"


def test_clients_openai_parse_and_streamed_tools(base_url: str) -> None:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused")
    parsed = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "A pet?"}], response_format=Pet, max_tokens=60
    )
    assert isinstance(parsed.choices[0].message.parsed, Pet)
    tool = openai.pydantic_function_tool(Weather, name="get_weather")
    with client.chat.completions.stream(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[tool],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=80,
    ) as stream:
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert isinstance(call.function.parsed_arguments, Weather)
    assert final.choices[0].finish_reason == "tool_calls"


def test_clients_openai_n_penalties_developer_role_and_model_card(base_url: str) -> None:
    import httpx
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused")
    assert client.models.retrieve(MODEL).id == MODEL
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi."}]
    sampled = {"n": 3, "seed": 11, "temperature": 1.0, "max_tokens": 8, "presence_penalty": 0.5}
    first = client.chat.completions.create(model=MODEL, messages=messages, frequency_penalty=0.5, **sampled)
    again = client.chat.completions.create(model=MODEL, messages=messages, frequency_penalty=0.5, **sampled)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices] and len(set(texts)) > 1
    token = 100  # +100 outweighs any logit of the random model: greedy picks it every time
    forced = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, logit_bias={str(token): 100}
    )
    root = base_url.removesuffix("/v1")
    expected = httpx.post(f"{root}/detokenize", json={"model": MODEL, "tokens": [token] * 5}).json()
    assert forced.choices[0].message.content == expected["prompt"]


def test_clients_openai_echo_logprobs_score_a_continuation(base_url: str) -> None:
    """lm-eval's loglikelihood request through the openai SDK (token ids, echo, logprobs 1, max_tokens 1):
    the prompt's logprobs first, the first null, none above its position's best, and the greedy token
    generated after them is that position's best."""
    import httpx
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused")
    root = base_url.removesuffix("/v1")
    tokenized = httpx.post(
        f"{root}/tokenize", json={"model": MODEL, "prompt": "Question: a bento? Answer: yes"}
    )
    ids = tokenized.json()["tokens"]
    scored = client.completions.create(
        model=MODEL, prompt=[ids], max_tokens=1, temperature=0, echo=True, logprobs=1
    )
    logprobs = scored.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(ids) + 1
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for lp, top in zip(logprobs.token_logprobs[1:], logprobs.top_logprobs[1:], strict=True):
        assert len(top) == 1 and lp <= max(top.values()) + 1e-4 and lp < 0
    assert logprobs.token_logprobs[-1] == pytest.approx(max(logprobs.top_logprobs[-1].values()), abs=1e-4)
    text = httpx.post(f"{root}/detokenize", json={"model": MODEL, "tokens": ids}).json()["prompt"]
    assert scored.choices[0].text.startswith(text)


def langchain_model(base_url: str):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=MODEL, base_url=base_url, api_key="unused", max_tokens=80, temperature=0)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_clients_langchain_structured_output(base_url: str, method: str) -> None:
    result = langchain_model(base_url).with_structured_output(Pet, method=method).invoke("Describe a pet.")
    assert isinstance(result, Pet)


def test_clients_langchain_json_mode(base_url: str) -> None:
    model = langchain_model(base_url).bind(max_tokens=120)
    result = model.with_structured_output(None, method="json_mode").invoke("Answer in JSON.")
    assert isinstance(result, dict)


def test_clients_langchain_bind_tools(base_url: str) -> None:
    model = langchain_model(base_url).bind_tools([Weather], tool_choice="Weather", parallel_tool_calls=False)
    message = model.invoke("What is the weather?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "Weather"
    Weather(**message.tool_calls[0]["args"])


def agents_model(base_url: str):
    from agents import OpenAIChatCompletionsModel
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="unused")
    return OpenAIChatCompletionsModel(model=MODEL, openai_client=client)


def test_clients_agents_sdk_calls_a_function_tool_and_uses_its_result(base_url: str) -> None:
    from agents import Agent, ModelSettings, Runner, ToolCallOutputItem, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    calls: list[str] = []

    @function_tool
    def get_weather(city: Literal["Paris", "Oslo", "Rome"]) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    agent = Agent(
        name="forecaster",
        instructions="Use the tool, then answer.",
        tools=[get_weather],
        model=agents_model(base_url),
        model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, max_tokens=80),
    )
    result = asyncio.run(Runner.run(agent, "Weather in Oslo?", max_turns=4))
    assert calls and calls[0] in ("Paris", "Oslo", "Rome")
    outputs = [item.output for item in result.new_items if isinstance(item, ToolCallOutputItem)]
    assert outputs[0] == f"sunny in {calls[0]}"
    assert isinstance(result.final_output, str)  # the turn after the tool's result (tool_choice reset)


def test_clients_agents_sdk_typed_output(base_url: str) -> None:
    from agents import Agent, ModelSettings, Runner, set_tracing_disabled

    set_tracing_disabled(True)
    agent = Agent(
        name="describer",
        instructions="Describe a pet.",
        output_type=Pet,
        model=agents_model(base_url),
        model_settings=ModelSettings(max_tokens=80),
    )
    assert isinstance(asyncio.run(Runner.run(agent, "A pet, please.")).final_output, Pet)


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_clients_instructor(base_url: str, mode: str) -> None:
    import instructor
    import openai

    client = instructor.from_openai(
        openai.OpenAI(base_url=base_url, api_key="unused"), mode=getattr(instructor.Mode, mode)
    )
    pet = client.chat.completions.create(
        model=MODEL,
        response_model=Pet,
        messages=[{"role": "user", "content": "Describe a pet."}],
        max_tokens=80,
        max_retries=0,
    )
    assert isinstance(pet, Pet)


def test_clients_guidellm_short_run_with_its_default_validation(server, tmp_path: Path) -> None:
    """guidellm checks GET /health before it starts, then drives fixed-length synthetic requests."""
    from shardbento.tiny.models import ensure_generated

    output = tmp_path / "guidellm.json"
    command = [
        str(Path(sys.executable).parent / "guidellm"),
        "run",
        "--backend",
        f"kind=openai_http,target={server.url},model={MODEL}",
        "--profile",
        "kind=synchronous",
        "--constraint",
        "kind=max_requests,count=4",
        "--tokenizer",
        f"kind=huggingface_auto,model={ensure_generated(MODEL)}",
        "--data",
        "kind=synthetic_text,prompt_tokens=32,output_tokens=8",
        "--output",
        f"kind=json,path={output}",
        "--disable-console-interactive",
    ]
    for _ in range(2):
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        requests = json.loads(output.read_text())["benchmarks"][0]["requests"]
        assert not requests["errored"] and not requests["incomplete"], requests
        successful = requests["successful"]
        # guidellm's scheduler can stop before it records its last request (seen once on a slow machine:
        # 4 requests generated, 3 processed, none errored or incomplete): run it once more then.
        if len(successful) == 4:
            break
    assert len(successful) == 4
    assert all(r["output_tokens"] == 8 for r in successful)
