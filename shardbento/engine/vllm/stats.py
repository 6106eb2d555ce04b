"""Our RequestMetrics on the vLLM engine: what only vLLM's scheduler knows from its stats, what a request
got from its own stream. Reads vLLM's stats objects by attribute; imports no vllm.

Sources, family by family:
- vLLM's `SchedulerStats`, each engine step (through `statlogger.py`): running and waiting requests,
  KV cache usage, prefix cache queries and hits. Only the scheduler knows its queue and its blocks.
- vLLM's `IterationStats`: prompt tokens (counted once, when a request's prefill is done) and
  preemptions (a scheduler event).
- The request's stream (`RequestTimer`, fed by `VLLMEngine.stream`): generated tokens, time to first
  token, inter-token latency, end-to-end latency and the finish reason. Our `OutputStream` applies stop
  strings, EOS ids and max_tokens, so only it knows which tokens the client got and why the request
  ended: vLLM sees a stop-string finish as an abort (we abort it; it ends with no finished-request
  stats) and may have generated tokens past the stop by then. Times are taken where the tokens reach
  the service, on its clock, from when the engine was handed the request.
- Queue time (arrival to the start of prefill) is vLLM's own per-request interval (`RequestStateStats`:
  first scheduled less queued, on the engine core's clock), read from the request's first output, so
  it is observed once per request that was scheduled, stop-string finishes included.
"""

from __future__ import annotations

import time
from typing import Any

from shardbento.metrics import RequestMetrics

ENDED_BY_TOKEN = ("stop", "length")  # finishes with a last token (e2e latency is observed for these)


def queue_time_s(request_stats: Any) -> float | None:
    """vLLM's queue time for one request (first QUEUED to first SCHEDULED event), None until scheduled."""
    queued = getattr(request_stats, "queued_ts", 0.0) or 0.0
    scheduled = getattr(request_stats, "scheduled_ts", 0.0) or 0.0
    if queued <= 0.0 or scheduled <= 0.0:
        return None
    return max(scheduled - queued, 0.0)


class RequestTimer:
    """One request's tokens, latencies and finish, recorded as the transformers scheduler records them.

    `tokens(n)` is called when n new tokens reach the service together: the first token observes the
    time to first token, every later one an inter-token latency (the first of a burst the gap since the
    previous token, the rest 0: they arrived together), so the histogram's sum over its count is the
    mean time per token and its count is tokens - 1 per request, as on the transformers engine.
    """

    def __init__(self, metrics: RequestMetrics, arrival_s: float | None = None) -> None:
        self._metrics = metrics
        self._arrival_s = time.monotonic() if arrival_s is None else arrival_s
        self._last_token_s: float | None = None
        self._queue_seen = False
        self.ended = False

    def scheduled(self, request_stats: Any) -> None:
        """Observe vLLM's queue time once, from the request's first output that has it."""
        if self._queue_seen or request_stats is None:
            return
        queue_s = queue_time_s(request_stats)
        if queue_s is not None:
            self._queue_seen = True
            self._metrics.queue.observe(queue_s)

    def tokens(self, count: int, now_s: float | None = None) -> None:
        if count <= 0:
            return
        now = time.monotonic() if now_s is None else now_s
        metrics = self._metrics
        metrics.generation_tokens.inc(count)
        if self._last_token_s is None:
            metrics.ttft.observe(now - self._arrival_s)
        else:
            metrics.itl.observe(now - self._last_token_s)
        for _ in range(count - 1):
            metrics.itl.observe(0.0)
        self._last_token_s = now

    def end(self, reason: str | None) -> None:
        """Count the request once by reason (stop, length, abort, error); None: it never started (vLLM
        refused it), so it is not counted, as the transformers engine counts no refused request."""
        if self.ended:
            return
        self.ended = True
        if reason is None:
            return
        if reason in ENDED_BY_TOKEN and self._last_token_s is not None:
            self._metrics.e2e.observe(self._last_token_s - self._arrival_s)
        self._metrics.finished(reason)


class SchedulerRecorder:
    """vLLM's per-step stats on one model's families. One per model, shared by its engine cores'
    loggers: with several cores (data parallel) the gauges are their sum (KV usage: their mean)."""

    def __init__(self, metrics: RequestMetrics) -> None:
        self._metrics = metrics
        self._per_engine: dict[int, tuple[int, int, float]] = {}
        self._lora_reported = ("", "")  # lora_requests_info once a request names an adapter, on change

    def record(self, engine_index: int, scheduler_stats: Any, iteration_stats: Any) -> None:
        metrics = self._metrics
        if scheduler_stats is not None:
            waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            self._per_engine[engine_index] = (
                scheduler_stats.num_running_reqs,
                waiting,
                scheduler_stats.kv_cache_usage,
            )
            states = list(self._per_engine.values())
            metrics.running.set(sum(s[0] for s in states))
            metrics.waiting.set(sum(s[1] for s in states))
            metrics.kv_usage.set(sum(s[2] for s in states) / len(states))
            adapters = tuple(
                ",".join(sorted(getattr(scheduler_stats, f"{state}_lora_adapters", None) or {}))
                for state in ("running", "waiting")
            )
            if adapters != self._lora_reported:
                self._lora_reported = adapters
                metrics.lora_info(*adapters)
            prefix = scheduler_stats.prefix_cache_stats
            if prefix is not None:
                metrics.prefix_queries.inc(prefix.queries)
                metrics.prefix_hits.inc(prefix.hits)
        if iteration_stats is not None:
            metrics.prompt_tokens.inc(iteration_stats.num_prompt_tokens)
            metrics.preemptions.inc(iteration_stats.num_preempted_reqs)
