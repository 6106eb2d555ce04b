"""/metrics of a real `bentoml serve`: every family is there and the counters move with a request."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families
from servers import Server

FAMILIES = (
    "time_to_first_token_seconds",
    "inter_token_latency_seconds",
    "e2e_request_latency_seconds",
    "request_queue_time_seconds",
    "num_requests_running",
    "num_requests_waiting",
    "kv_cache_usage_perc",
    "prompt_tokens",
    "generation_tokens",
    "request_success",
)


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("shardbento:")
        for s in family.samples
    }


def value(found: dict, name: str, **labels: str) -> float:
    return found.get(
        (f"shardbento:{name}", tuple(sorted({"model_name": "tiny-llama", **labels}.items()))), 0.0
    )


def test_metrics_endpoint_moves_with_requests(text_server: Server) -> None:
    before = samples(text_server.url)
    body = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": "Count the bento boxes."}],
        "max_tokens": 7,
        "ignore_eos": True,
    }
    reply = httpx.post(f"{text_server.url}/v1/chat/completions", json=body, timeout=120).json()
    after = samples(text_server.url)
    names = {name for name, _ in after}
    for family in FAMILIES:
        assert any(n.startswith(f"shardbento:{family}") for n in names), family
    usage = reply["usage"]
    generated = value(after, "generation_tokens_total") - value(before, "generation_tokens_total")
    prompted = value(after, "prompt_tokens_total") - value(before, "prompt_tokens_total")
    assert (generated, prompted) == (usage["completion_tokens"], usage["prompt_tokens"])
    assert (
        value(after, "e2e_request_latency_seconds_count")
        == value(before, "e2e_request_latency_seconds_count") + 1
    )
    finished = value(after, "request_success_total", finished_reason="length")
    assert finished == value(before, "request_success_total", finished_reason="length") + 1
    assert value(after, "num_requests_running") == 0
