"""A 2-rank CPU tensor-parallel service (gloo) against one process, through the real HTTP API."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import pytest
from reliability.scenarios import write_catalog
from servers import Server, serve, wait_for

PROMPTS = ["The quick brown fox", "Once upon a time", "1, 2, 3,"]
TP_MODEL = "tiny-llama-tp2"


@pytest.fixture(scope="module")
def tp_server(log_dir: Path):
    with serve(TP_MODEL, log_dir, ready_timeout_s=300) as server:
        yield server


def _generate(server: Server, prompt: str, **sampling: object) -> dict:
    response = httpx.post(
        f"{server.url}/generate", json={"prompt": prompt, "max_tokens": 24, **sampling}, timeout=120
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_tensor_parallel_greedy_tokens_equal_single_process(tp_server: Server, text_server: Server) -> None:
    for prompt in PROMPTS:
        sharded, single = _generate(tp_server, prompt), _generate(text_server, prompt)
        assert sharded["text"] == single["text"]
        assert sharded["usage"] == single["usage"]


def test_tensor_parallel_seeded_sampling_equals_single_process(
    tp_server: Server, text_server: Server
) -> None:
    sampling = {"temperature": 0.8, "seed": 1234}
    assert (
        _generate(tp_server, PROMPTS[0], **sampling)["text"]
        == _generate(text_server, PROMPTS[0], **sampling)["text"]
    )


def test_tensor_parallel_models_reports_tensor_mode(tp_server: Server) -> None:
    card = httpx.post(f"{tp_server.url}/models", json={}, timeout=10).json()
    assert card["parallel"] == "tensor x2"
    assert len(card["devices"]) == 2


def _complete(server: Server, body: dict) -> dict:
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def _burst(server: Server, bodies: list[dict], path: str = "/v1/completions") -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(client.post(path, json=body) for body in bodies))

    return asyncio.run(run())


def _answer(reply: dict) -> tuple[str, str, dict]:
    return reply["choices"][0]["text"], reply["choices"][0]["finish_reason"], reply["usage"]


def _metric(server: Server, name: str, label: str = "") -> float:
    """The sum of a shardbento metric's samples whose labels contain `label`."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    pattern = rf"^shardbento:{name}\{{([^}}]*)\}} ([0-9.e+-]+)$"
    return sum(float(v) for labels, v in re.findall(pattern, text, flags=re.MULTILINE) if label in labels)


def test_tensor_parallel_concurrent_greedy_equals_one_at_a_time(
    tp_server: Server, text_server: Server
) -> None:
    bodies = [
        {"model": TP_MODEL, "prompt": prompt, "max_tokens": n, "ignore_eos": True}
        for prompt in PROMPTS
        for n in (9, 23)
    ]
    together = [_answer(r.json()) for r in _burst(tp_server, bodies)]
    alone = [_answer(_complete(tp_server, body)) for body in bodies]
    single = [_answer(_complete(text_server, {**body, "model": "tiny-llama"})) for body in bodies]
    assert together == alone == single


def test_tensor_parallel_stop_and_max_tokens_hold_inside_batch(tp_server: Server) -> None:
    body = {"model": TP_MODEL, "prompt": PROMPTS[1], "ignore_eos": True}
    free_text = _complete(tp_server, {**body, "max_tokens": 30})["choices"][0]["text"]
    stop = free_text[len(free_text) // 2 : len(free_text) // 2 + 3]
    replies = _burst(
        tp_server,
        [
            {**body, "max_tokens": 30, "stop": [stop]},
            {**body, "prompt": PROMPTS[0], "max_tokens": 3},
            {**body, "prompt": PROMPTS[2], "max_tokens": 17},
        ],
    )
    stopped, short, longer = (_answer(r.json()) for r in replies)
    assert stopped[:2] == (free_text[: free_text.find(stop)], "stop")
    assert (short[1], short[2]["completion_tokens"]) == ("length", 3)
    assert (longer[1], longer[2]["completion_tokens"]) == ("length", 17)


def test_tensor_parallel_metrics_move_with_requests(tp_server: Server) -> None:
    names = ("generation_tokens_total", "prompt_tokens_total", "time_to_first_token_seconds_count")
    before = {name: _metric(tp_server, name) for name in names}
    finished = _metric(tp_server, "request_success_total", 'finished_reason="length"')
    reply = _complete(
        tp_server, {"model": TP_MODEL, "prompt": PROMPTS[0], "max_tokens": 7, "ignore_eos": True}
    )
    after = {name: _metric(tp_server, name) for name in names}
    usage = reply["usage"]
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == usage["completion_tokens"]
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == usage["prompt_tokens"]
    assert after["time_to_first_token_seconds_count"] == before["time_to_first_token_seconds_count"] + 1
    assert _metric(tp_server, "request_success_total", 'finished_reason="length"') == finished + 1
    wait_for(lambda: _metric(tp_server, "num_requests_running") == 0, "the running gauge back to 0")


def test_tensor_parallel_client_disconnect_frees_slot(tp_server: Server) -> None:
    aborted = _metric(tp_server, "request_success_total", 'finished_reason="abort"')
    body = {"model": TP_MODEL, "prompt": PROMPTS[1], "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{tp_server.url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        # The gauge reaches this process with rank 0's next step report, not with the first token.
        wait_for(lambda: _metric(tp_server, "num_requests_running") == 1, "the stream counted as running")
    wait_for(
        lambda: _metric(tp_server, "request_success_total", 'finished_reason="abort"') > aborted,
        "the abandoned request aborted",
    )
    assert _metric(tp_server, "request_success_total", 'finished_reason="abort"') == aborted + 1
    # rank 0 may ship the abort and the gauge's new value in two reports (its idle flush between them)
    wait_for(lambda: _metric(tp_server, "num_requests_running") == 0, "the running gauge back to 0")


def test_tensor_parallel_overload_is_429_with_retry_after(
    log_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    limits = {"max_num_seqs": 2, "max_waiting": 1}
    catalog = write_catalog(tmp_path_factory.mktemp("tp-limits"), TP_MODEL, base=TP_MODEL, limits=limits)
    with serve(TP_MODEL, log_dir, env={"SHARDBENTO_CATALOG": str(catalog)}, ready_timeout_s=300) as server:
        body = {"prompt": PROMPTS[0], "max_tokens": 32}
        responses = _burst(server, [body] * 12, path="/generate")
        assert {r.status_code for r in responses} <= {200, 429}
        refused = [r for r in responses if r.status_code == 429]
        assert refused, "12 requests at once past 2 running + 1 waiting were never refused"
        assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
        assert all(r.json()["error"]["type"] == "rate_limit_error" for r in refused)
        served = [r.json()["text"] for r in responses if r.status_code == 200]
        assert served and len(set(served)) == 1


@pytest.mark.parametrize("ids", [[10_000_000], [-1], [5, 10_000_000]])
def test_tensor_parallel_out_of_vocab_ids_are_the_same_400(
    tp_server: Server, text_server: Server, ids: list[int]
) -> None:
    replies = [
        httpx.post(f"{server.url}/v1/completions", json={"model": model, "prompt": ids}, timeout=60)
        for server, model in ((tp_server, TP_MODEL), (text_server, "tiny-llama"))
    ]
    assert [r.status_code for r in replies] == [400, 400]
    errors = [r.json()["error"] for r in replies]
    assert errors[0] == errors[1] and errors[0]["param"] == "prompt"
    assert "[0, " in errors[0]["message"]


def test_tensor_parallel_constrained_output_and_tool_calls_equal_single_process(
    tp_server: Server, text_server: Server
) -> None:
    """Rank 0 samples under the grammar: the same schema-valid answer and the same forced call."""
    schema = {"type": "object", "properties": {"pick": {"enum": ["a", "b", "c"]}}, "required": ["pick"]}
    tool = {"type": "function", "function": {"name": "choose", "parameters": schema}}
    bodies = [
        {"response_format": {"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}}},
        {"tools": [tool], "tool_choice": "required", "parallel_tool_calls": False},
    ]
    for extra in bodies:
        body = {
            "model": "tiny-llama",
            "messages": [{"role": "user", "content": PROMPTS[0]}],
            "max_tokens": 80,
        }
        answers = []
        for server, model in ((tp_server, TP_MODEL), (text_server, "tiny-llama")):
            response = httpx.post(
                f"{server.url}/v1/chat/completions", json={**body, **extra, "model": model}, timeout=120
            )
            assert response.status_code == 200, response.text
            message = response.json()["choices"][0]["message"]
            answers.append((message["content"], [c["function"] for c in message["tool_calls"]]))
        assert answers[0] == answers[1]
        content, calls = answers[0]
        assert json.loads(calls[0]["arguments"] if calls else content)["pick"] in ("a", "b", "c")
