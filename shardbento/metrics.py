"""Engine metrics in vLLM's vocabulary under the `shardbento:` prefix, served by BentoML's /metrics."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

PREFIX = "shardbento"
# Seconds; spans a CPU toy model's milliseconds and a GPU model's long queues.
_LATENCY_BUCKETS_S = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    60.0,
)
_STEP_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
_E2E_BUCKETS_S = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """The metric families one engine updates; labelled by model name."""

    time_to_first_token: Any
    inter_token_latency: Any
    e2e_request_latency: Any
    request_queue_time: Any
    num_requests_running: Any
    num_requests_waiting: Any
    kv_cache_usage: Any
    prompt_tokens: Any
    generation_tokens: Any
    prefix_cache_queries: Any
    prefix_cache_hits: Any
    num_preemptions: Any
    request_success: Any
    engine_step: Any
    engine_step_host: Any
    lora_requests_info: Any


@functools.cache
def engine_metrics() -> EngineMetrics:
    """Created on first use, never at import: BentoML sets PROMETHEUS_MULTIPROC_DIR in the worker
    before the engine starts, and prometheus_client picks its storage when first imported."""
    from prometheus_client import Counter, Gauge, Histogram

    def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
        return Histogram(f"{PREFIX}:{name}", doc, ["model_name"], buckets=buckets)

    def gauge(name: str, doc: str) -> Any:
        return Gauge(f"{PREFIX}:{name}", doc, ["model_name"], multiprocess_mode="livesum")

    return EngineMetrics(
        time_to_first_token=histogram(
            "time_to_first_token_seconds", "Arrival to first generated token.", _LATENCY_BUCKETS_S
        ),
        inter_token_latency=histogram(
            "inter_token_latency_seconds", "Time between consecutive tokens of a request.", _LATENCY_BUCKETS_S
        ),
        e2e_request_latency=histogram(
            "e2e_request_latency_seconds", "Arrival to the last token.", _E2E_BUCKETS_S
        ),
        request_queue_time=histogram(
            "request_queue_time_seconds", "Arrival to the start of prefill.", _E2E_BUCKETS_S
        ),
        num_requests_running=gauge("num_requests_running", "Requests in the decode batch."),
        num_requests_waiting=gauge("num_requests_waiting", "Requests waiting for or in prefill."),
        kv_cache_usage=gauge("kv_cache_usage_perc", "Fraction of the KV slots' tokens in use (0-1)."),
        prompt_tokens=Counter(f"{PREFIX}:prompt_tokens", "Prefilled prompt tokens.", ["model_name"]),
        generation_tokens=Counter(f"{PREFIX}:generation_tokens", "Generated tokens.", ["model_name"]),
        prefix_cache_queries=Counter(
            f"{PREFIX}:prefix_cache_queries", "Prompt tokens looked up for reusable KV.", ["model_name"]
        ),
        prefix_cache_hits=Counter(
            f"{PREFIX}:prefix_cache_hits", "Prompt tokens whose KV was reused, not computed.", ["model_name"]
        ),
        num_preemptions=Counter(
            f"{PREFIX}:num_preemptions",
            "Sequences taken out of the batch because the KV pool was full (recomputed later).",
            ["model_name"],
        ),
        engine_step=histogram(
            "engine_step_seconds", "One engine step: its forward and everything around it.", _STEP_BUCKETS_S
        ),
        engine_step_host=histogram(
            "engine_step_host_seconds",
            "One engine step's work outside the model's forward calls: planning, token selection, output "
            "(on GPUs also the wait for the forward's kernels, which the copy of the chosen ids makes).",
            _STEP_BUCKETS_S,
        ),
        lora_requests_info=Gauge(
            f"{PREFIX}:lora_requests_info",
            "LoRA adapters of running and waiting requests (vLLM's metric): the labels say which, the "
            "value is when they last changed (Unix seconds; the newest series is the current one).",
            ["model_name", "max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            multiprocess_mode="mostrecent",
        ),
        request_success=Counter(
            f"{PREFIX}:request_success",
            "Finished requests by finish reason (stop, length, abort, error).",
            ["model_name", "finished_reason"],
        ),
    )


class RequestMetrics:
    """One model's view of the metric families; every method is cheap enough to call per step."""

    # attribute -> EngineMetrics family; the tensor-parallel relay records these same attributes
    CHILDREN: ClassVar[dict[str, str]] = {
        "ttft": "time_to_first_token",
        "itl": "inter_token_latency",
        "e2e": "e2e_request_latency",
        "queue": "request_queue_time",
        "running": "num_requests_running",
        "waiting": "num_requests_waiting",
        "kv_usage": "kv_cache_usage",
        "prompt_tokens": "prompt_tokens",
        "generation_tokens": "generation_tokens",
        "prefix_queries": "prefix_cache_queries",
        "prefix_hits": "prefix_cache_hits",
        "preemptions": "num_preemptions",
        "step": "engine_step",
        "step_host": "engine_step_host",
    }

    def __init__(self, model_name: str, max_loras: int = 0) -> None:
        families = engine_metrics()
        self._model = model_name
        self._max_loras = str(max_loras)
        self._lora_info = families.lora_requests_info
        for attribute, family in self.CHILDREN.items():
            setattr(self, attribute, getattr(families, family).labels(model_name))
        self._success = families.request_success

    def finished(self, reason: str) -> None:
        self._success.labels(self._model, reason).inc()

    def lora_info(self, running: str, waiting: str) -> None:
        """The adapters (comma-separated names) of the running and of the waiting requests now."""
        import time

        self._lora_info.labels(self._model, self._max_loras, running, waiting).set(time.time())
