"""Load and faults against real `bentoml serve` processes: what a client sees, and nothing lost or hung."""

from __future__ import annotations

import time

import httpx
import pytest
from reliability.load import measure, report
from reliability.scenarios import corrupt_shard, dead_engine, dead_rank, sigterm_drain

RSS_GROWTH_BOUND_MIB = 200  # tiny model, ~550 MiB resident: growth past this is a leak


def test_load_mixed_traffic_loses_nothing(guarded_server) -> None:
    server, config = guarded_server
    figures = measure(
        server.url,
        server.process.pid,
        config.api_key,
        model="tiny-llama",
        max_body_bytes=config.max_body_bytes,
        num_requests=200,
        concurrency=32,
    )
    print(report(figures))
    assert figures.problems == []
    assert figures.unexpected_5xx == 0
    assert figures.in_flight_after == 0
    assert figures.accepted >= figures.requests // 4
    assert figures.rss_growth_mib < RSS_GROWTH_BOUND_MIB
    assert config.api_key not in server.log()


@pytest.mark.parametrize("fault", ["error", "oom"])
def test_faults_generation_that_raises_fails_that_request_only(guarded_server, fault) -> None:
    server, config = guarded_server
    auth = {"authorization": f"Bearer {config.api_key}"}
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    failed = httpx.post(
        f"{server.url}/chat", json=body, headers={**auth, "x-shardbento-fault": fault}, timeout=60
    )
    assert failed.status_code == 500
    assert failed.json()["error"]["code"] == "generation_failed"
    for path in ("/chat", "/chat_stream"):
        after = httpx.post(f"{server.url}{path}", json=body, headers=auth, timeout=60)
        assert after.status_code == 200, after.text
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200


def test_faults_injection_is_off_by_default(text_server) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    response = httpx.post(
        f"{text_server.url}/chat", json=body, headers={"x-shardbento-fault": "oom"}, timeout=60
    )
    assert response.status_code == 200


def test_startup_corrupt_shard_fails_naming_the_file(log_dir, tmp_path) -> None:
    seen = corrupt_shard(log_dir, tmp_path)
    assert seen["livez"] == 503
    assert seen["readyz"] == 503
    assert seen["chat_status"] == 503
    assert seen["shard"] in seen["chat_error"]["message"]
    assert seen["log_names_shard"]


def test_shutdown_sigterm_drains_in_flight_then_exits(log_dir) -> None:
    seen = sigterm_drain(log_dir)
    assert seen["short"]["complete"] and seen["short"]["status"] == 200, seen
    assert seen["long_cut"] == seen["long_count"], seen  # more work than the grace period: all cut
    assert seen["exit_code"] == 0, seen
    assert seen["exit_after_s"] < seen["grace_s"] + 30, seen


def test_tp_dead_rank_fails_readyz_and_requests_fast(log_dir) -> None:
    seen = dead_rank(log_dir)
    assert seen["chat_before"] == 200
    assert seen["readyz_after"] == 503
    assert seen["chat_after"] == 503, seen
    assert "not serving" in seen["chat_error"]["message"]
    assert seen["chat_after_s"] < 5
    assert seen["retry_after"] is not None
    assert seen["log_names_rank"] and seen["ranks_reaped"], seen


def test_dead_engine_process_ends_open_streams_and_the_service_asks_to_restart(log_dir) -> None:
    seen = dead_engine(log_dir)
    assert seen["engine_processes"] == 1 and seen["stream_status"] == 200
    assert "error" in seen["last_event"] and "stopped serving" in seen["last_event"]["error"]["message"], seen
    assert (seen["livez_after"], seen["readyz_after"], seen["chat_after"]) == (503, 503, 503), seen
    assert seen["chat_after_s"] < 5 and "not serving" in seen["chat_error"]["message"]


def test_limits_request_timeout_is_408(log_dir) -> None:
    from servers import serve

    timeout_s = 1
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1000}
    with serve("tiny-llama", log_dir, env={"SHARDBENTO_REQUEST_TIMEOUT_S": str(timeout_s)}) as server:
        started = time.monotonic()
        response = httpx.post(f"{server.url}/chat", json=body, timeout=60)
        elapsed_s = time.monotonic() - started
        assert response.status_code == 408, response.text
        assert response.json()["error"]["code"] == "request_timeout"
        assert elapsed_s < timeout_s + 5
        after = httpx.post(f"{server.url}/chat", json={**body, "max_tokens": 2}, timeout=60)
        assert after.status_code == 200
