"""The vLLM engine's metrics mapping (engine/vllm/stats.py) on the real Prometheus families, no vLLM:
vLLM's stats objects are stood in for by their fields (tests/vllm/test_vllm_statlogger.py passes vLLM's own)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from prometheus_client import REGISTRY

from shardbento.engine.vllm.stats import RequestTimer, SchedulerRecorder, queue_time_s
from shardbento.metrics import RequestMetrics


def value(model: str, name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"shardbento:{name}", {"model_name": model, **labels}) or 0.0


@dataclass
class Prefix:
    queries: int = 0
    hits: int = 0


@dataclass
class Scheduler:
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    num_skipped_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_stats: Prefix = field(default_factory=Prefix)


@dataclass
class Iteration:
    num_prompt_tokens: int = 0
    num_preempted_reqs: int = 0


@dataclass
class RequestStats:
    queued_ts: float = 0.0
    scheduled_ts: float = 0.0


def test_vllm_stats_timer_counts_tokens_and_latencies_like_the_scheduler() -> None:
    model = "stats-timer"
    timer = RequestTimer(RequestMetrics(model), arrival_s=100.0)
    timer.scheduled(RequestStats())  # not scheduled yet: nothing observed
    timer.scheduled(RequestStats(queued_ts=50.0, scheduled_ts=50.25))
    timer.scheduled(RequestStats(queued_ts=50.0, scheduled_ts=51.0))  # observed once
    timer.tokens(1, now_s=100.5)
    timer.tokens(3, now_s=101.0)  # three tokens arrived together
    timer.tokens(0, now_s=102.0)  # an output with no new token
    timer.end("length")
    timer.end("abort")  # the stream's cleanup after the end: not a second request
    assert value(model, "request_queue_time_seconds_sum") == 0.25
    assert value(model, "request_queue_time_seconds_count") == 1
    assert value(model, "generation_tokens_total") == 4
    assert value(model, "time_to_first_token_seconds_sum") == 0.5
    assert value(model, "inter_token_latency_seconds_count") == 3  # tokens - 1
    assert value(model, "inter_token_latency_seconds_sum") == 0.5  # first to last token
    assert value(model, "e2e_request_latency_seconds_sum") == 1.0  # arrival to the last token
    assert value(model, "request_success_total", finished_reason="length") == 1
    assert value(model, "request_success_total", finished_reason="abort") == 0


@pytest.mark.parametrize(("reason", "counted"), [("abort", 1), ("error", 1), (None, 0)])
def test_vllm_stats_timer_ends_without_a_last_token(reason: str | None, counted: int) -> None:
    """A client gone or an engine error counts by reason without an e2e latency; a request vLLM refused
    before running it is not counted at all."""
    model = f"stats-end-{reason}"
    timer = RequestTimer(RequestMetrics(model), arrival_s=0.0)
    timer.tokens(1, now_s=0.1)
    timer.end(reason)
    assert value(model, "e2e_request_latency_seconds_count") == 0
    total = sum(value(model, "request_success_total", finished_reason=r) for r in ("abort", "error"))
    assert total == counted


def test_vllm_stats_queue_time_needs_both_events() -> None:
    assert queue_time_s(RequestStats(queued_ts=1.0, scheduled_ts=0.0)) is None
    assert queue_time_s(RequestStats(queued_ts=1.0, scheduled_ts=3.5)) == 2.5
    assert queue_time_s(None) is None


def test_vllm_stats_recorder_maps_scheduler_and_iteration_stats() -> None:
    model = "stats-recorder"
    recorder = SchedulerRecorder(RequestMetrics(model))
    step = Scheduler(3, 2, 1, 0.5, Prefix(queries=40, hits=16))
    recorder.record(0, step, Iteration(num_prompt_tokens=40, num_preempted_reqs=1))
    assert value(model, "num_requests_running") == 3
    assert value(model, "num_requests_waiting") == 3  # waiting plus deferred, as vLLM's own gauge
    assert value(model, "kv_cache_usage_perc") == 0.5
    assert (value(model, "prefix_cache_queries_total"), value(model, "prefix_cache_hits_total")) == (40, 16)
    assert value(model, "prompt_tokens_total") == 40
    assert value(model, "num_preemptions_total") == 1
    recorder.record(0, Scheduler(), None)  # the step after the last request finished
    assert (value(model, "num_requests_running"), value(model, "num_requests_waiting")) == (0, 0)
    assert value(model, "prompt_tokens_total") == 40  # counters only grow


def test_vllm_stats_recorder_sums_engine_cores() -> None:
    """Data parallel: each engine core's logger reports its own scheduler; the gauges are the model's."""
    model = "stats-cores"
    recorder = SchedulerRecorder(RequestMetrics(model))
    recorder.record(0, Scheduler(num_running_reqs=4, num_waiting_reqs=1, kv_cache_usage=0.2), None)
    recorder.record(1, Scheduler(num_running_reqs=2, num_waiting_reqs=5, kv_cache_usage=0.6), None)
    recorder.record(0, Scheduler(num_running_reqs=3, num_waiting_reqs=0, kv_cache_usage=0.2), None)
    assert (value(model, "num_requests_running"), value(model, "num_requests_waiting")) == (5, 5)
    assert value(model, "kv_cache_usage_perc") == pytest.approx(0.4)
