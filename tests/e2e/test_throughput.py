"""The batching engine behind a real `bentoml serve`: /metrics moves, the bench CLI reports on it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import REPO, Server, serve

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


@pytest.fixture(scope="module")
def metrics_server(log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Its own BENTOML_HOME: the Prometheus multiprocess directory lives there, and another
    # `bentoml serve` starting on the same machine empties a shared one.
    home = tmp_path_factory.mktemp("bentoml-home")
    with serve("tiny-llama", log_dir, env={"BENTOML_HOME": str(home)}) as server:
        yield server


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


def test_metrics_endpoint_moves_with_requests(metrics_server: Server) -> None:
    before = samples(metrics_server.url)
    body = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": "Count the bento boxes."}],
        "max_tokens": 7,
        "ignore_eos": True,
    }
    reply = httpx.post(f"{metrics_server.url}/v1/chat/completions", json=body, timeout=120).json()
    after = samples(metrics_server.url)
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


def test_bench_cli_reports_on_the_service(metrics_server: Server, tmp_path: Path) -> None:
    report_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    command = [sys.executable, "-m", "shardbento", "bench", "--url", metrics_server.url]
    command += ["--concurrency", "1,3", "--input-tokens", "40", "--output-tokens", "6", "--warmup", "1"]
    command += ["--requests-per-client", "1", "--min-requests", "2", "--json", str(report_path)]
    command += ["--plot", str(plot_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["model"] == "tiny-llama" and report["fixed_length"] is True
    assert [level["concurrency"] for level in report["levels"]] == [1, 3]
    for level in report["levels"]:
        assert level["errors"] == 0
        assert level["output_tokens_received"] == level["requests"] * report["output_tokens"]
        assert level["ttft_ms"]["p50"] <= level["e2e_ms"]["p50"]
        assert level["tpot_ms"]["p50"] is not None and level["output_token_throughput_per_s"] > 0
    assert [level["requests"] for level in report["levels"]] == [2, 3]
    assert "| c | requests |" in done.stdout
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
