"""The same catalog entry served by transformers and by vLLM: a client sees the same answers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from servers import Server, serve
from vllm_helpers import comparable, post, vllm_serve_env

MODEL = "tiny-llama"
CHAT = {"messages": [{"role": "user", "content": "Tell me about shards."}], "max_tokens": 24}
PET = {
    "type": "object",
    "properties": {"kind": {"enum": ["cat", "dog"]}, "age": {"type": "integer", "minimum": 0, "maximum": 20}},
    "required": ["kind", "age"],
}
PET_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET}}
CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]}
CITY_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}


@pytest.fixture(scope="module")
def hf_server(log_dir: Path) -> Iterator[Server]:
    with serve(MODEL, log_dir) as server:
        yield server


@pytest.fixture(scope="module")
def vllm_server(log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(MODEL, log_dir, env=vllm_serve_env(tmp_path_factory, MODEL), ready_timeout_s=300) as server:
        yield server


def test_vllm_service_reports_vllm_engine(vllm_server: Server) -> None:
    card = httpx.post(f"{vllm_server.url}/models", timeout=30).json()
    assert card["engine"] == "vllm"
    assert card["name"] == MODEL
    assert card["ready"] is True


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat", CHAT),
        ("/chat", {**CHAT, "stop": ["e"]}),
        ("/generate", {"prompt": "Once upon a time", "max_tokens": 16}),
        ("/v1/chat/completions", {**CHAT, "model": MODEL}),
        ("/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 16}),
        (
            "/v1/completions",
            {
                "model": MODEL,
                "prompt": "Once upon a time",
                "max_tokens": 16,
                "ignore_eos": True,
                "presence_penalty": 0.8,
                "frequency_penalty": 0.6,
                "logit_bias": {"5": 4.0, "6": -100},
            },
        ),
        ("/v1/chat/completions", {**CHAT, "model": MODEL, "max_tokens": 60, "response_format": PET_FORMAT}),
        (
            "/v1/chat/completions",
            {**CHAT, "model": MODEL, "max_tokens": 60, "response_format": {"type": "json_object"}},
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "model": MODEL, "max_tokens": 80, "tools": [CITY_TOOL], "tool_choice": "required"},
        ),
        ("/v1/chat/completions", {**CHAT, "model": MODEL, "tools": [CITY_TOOL]}),
        ("/v1/chat/completions", {**CHAT, "model": MODEL, "n": 2}),
        (
            "/chat",
            {
                **CHAT,
                "max_tokens": 80,
                "tools": [CITY_TOOL],
                "tool_choice": "required",
                "parallel_tool_calls": False,
            },
        ),
    ],
)
def test_vllm_service_greedy_answers_equal_transformers(
    hf_server: Server, vllm_server: Server, path: str, body: dict
) -> None:
    expected, actual = post(hf_server, path, body), post(vllm_server, path, body)
    assert actual.status_code == expected.status_code == 200, actual.text
    assert comparable(actual.json()) == comparable(expected.json())


def test_vllm_service_stream_framing_equals_transformers(hf_server: Server, vllm_server: Server) -> None:
    body = {**CHAT, "model": MODEL, "stream": True, "stream_options": {"include_usage": True}}
    expected, actual = _events(hf_server, body), _events(vllm_server, body)
    assert "".join(_chunk_text(e) for e in actual) == "".join(_chunk_text(e) for e in expected)
    assert [comparable(e) for e in actual[-2:]] == [comparable(e) for e in expected[-2:]]
    typed = [httpx.post(f"{s.url}/chat_stream", json=CHAT, timeout=120) for s in (hf_server, vllm_server)]
    assert typed[0].text == typed[1].text
    assert typed[0].headers["content-type"] == typed[1].headers["content-type"]


def test_vllm_service_errors_equal_transformers(hf_server: Server, vllm_server: Server) -> None:
    too_long = {**CHAT, "max_tokens": 10_000}
    for path, body in [("/chat", too_long), ("/v1/chat/completions", {**too_long, "model": MODEL})]:
        expected, actual = post(hf_server, path, body), post(vllm_server, path, body)
        assert actual.status_code == expected.status_code == 400
        assert actual.json() == expected.json()


def test_vllm_service_metrics_include_vllm(vllm_server: Server) -> None:
    post(vllm_server, "/chat", CHAT)
    metrics = httpx.get(f"{vllm_server.url}/metrics", timeout=30).text
    assert "vllm:" in metrics


def _events(server: Server, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def _chunk_text(event: dict) -> str:
    return "".join(c.get("delta", {}).get("content") or "" for c in event.get("choices", []))
