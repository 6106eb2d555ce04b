"""structured_outputs and prompt logprobs on the vLLM engine through the real /v1 app in-process, beside
the transformers engine: each constraint kind (vLLM's own guidance backend) judged and equal to the
transformers engine's greedy output; an lm-eval loglikelihood request and vLLM's prompt_logprobs field
equal to the transformers engine's (one vLLM engine serves the module: it takes a minute to start)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from asgi_app import openai_app, post_async
from structured_cases import ALIASES, KINDS, check_output, structured

from shardbento.catalog import load_spec
from shardbento.engine import create_engine
from shardbento.engine.vllm.engine import VLLMEngine

MODEL = "tiny-llama"
MESSAGES = [{"role": "user", "content": "Say something structured."}]


@pytest.fixture(scope="module")
def apps(loop: asyncio.AbstractEventLoop) -> Iterator[dict[str, Any]]:
    """One vLLM engine for the whole module (it takes about a minute to start) beside transformers."""
    hf = create_engine(load_spec(MODEL))
    vllm = VLLMEngine.load(load_spec(MODEL).model_copy(update={"engine": "vllm"}))
    try:
        yield {"transformers": openai_app(hf), "vllm": openai_app(vllm)}
    finally:
        vllm.close()
        hf.close()


def post(loop: asyncio.AbstractEventLoop, app: Any, path: str, body: dict) -> httpx.Response:
    return loop.run_until_complete(post_async(app, path, body))


def answers(loop: asyncio.AbstractEventLoop, apps: dict[str, Any], path: str, fields: dict) -> dict[str, str]:
    """Each engine's greedy text for the same request."""
    base = {"model": MODEL, "max_tokens": 60}
    base |= {"messages": MESSAGES} if path == "/chat/completions" else {"prompt": "Answer:"}
    result = {}
    for name, app in apps.items():
        response = post(loop, app, path, {**base, **fields})
        assert response.status_code == 200, (name, response.text)
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop", (name, choice)
        result[name] = choice["message"]["content"] if "message" in choice else choice["text"]
    return result


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_vllm_structured_outputs_each_kind_equals_transformers(
    loop: asyncio.AbstractEventLoop, apps: dict[str, Any], kind: str, path: str
) -> None:
    texts = answers(loop, apps, path, structured(kind))
    check_output(kind, texts["vllm"])
    assert texts["vllm"] == texts["transformers"]


def test_vllm_structured_outputs_guided_aliases(
    loop: asyncio.AbstractEventLoop, apps: dict[str, Any]
) -> None:
    for alias, kind in ALIASES.items():
        texts = answers(loop, apps, "/chat/completions", {alias: KINDS[kind]})
        check_output(kind, texts["vllm"])
        assert texts["vllm"] == texts["transformers"]


def test_vllm_structured_outputs_bad_grammar_is_the_same_400(
    loop: asyncio.AbstractEventLoop, apps: dict[str, Any]
) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "structured_outputs": {"grammar": "root ::= missing_rule"}}
    responses = {name: post(loop, app, "/chat/completions", body) for name, app in apps.items()}
    assert responses["vllm"].status_code == responses["transformers"].status_code == 400
    assert responses["vllm"].json() == responses["transformers"].json()
    assert responses["vllm"].json()["error"]["param"] == "structured_outputs.grammar"


def test_vllm_prompt_logprobs_equal_transformers(
    loop: asyncio.AbstractEventLoop, apps: dict[str, Any]
) -> None:
    """echo with logprobs (lm-eval's loglikelihood request) and the prompt_logprobs field: the same
    tokens, logprobs and alternatives from both engines, the first token's null."""
    body = {
        "model": MODEL,
        "prompt": "Question: which bento serves the model? Answer: the sharded one",
        "max_tokens": 1,
        "temperature": 0,
        "echo": True,
        "logprobs": 1,
        "prompt_logprobs": 2,
    }
    choices = {}
    for name, app in apps.items():
        response = post(loop, app, "/completions", body)
        assert response.status_code == 200, (name, response.text)
        choices[name] = response.json()["choices"][0]
    ours, theirs = choices["transformers"], choices["vllm"]
    assert ours["text"] == theirs["text"]
    assert ours["logprobs"]["tokens"] == theirs["logprobs"]["tokens"]
    assert theirs["logprobs"]["token_logprobs"][0] is None
    assert theirs["logprobs"]["token_logprobs"][1:] == pytest.approx(
        ours["logprobs"]["token_logprobs"][1:], abs=1e-3
    )
    assert len(theirs["prompt_logprobs"]) == len(ours["prompt_logprobs"]) > 5
    assert theirs["prompt_logprobs"][0] is ours["prompt_logprobs"][0] is None
    for a, b in zip(ours["prompt_logprobs"][1:], theirs["prompt_logprobs"][1:], strict=True):
        assert set(a) == set(b)
        for token_id, entry in a.items():
            assert b[token_id]["logprob"] == pytest.approx(entry["logprob"], abs=1e-3)
            assert b[token_id]["decoded_token"] == entry["decoded_token"]
            assert abs(b[token_id]["rank"] - entry["rank"]) <= 1
