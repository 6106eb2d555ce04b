"""A request inside the scheduler, and the pure planning helpers the scheduler uses on them."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from shardbento.engine.base import Delta
from shardbento.engine.batch.sampler import RequestSampler
from shardbento.engine.output import OutputStream


@dataclass(slots=True, eq=False)  # identity: the queues remove this very request
class Sequence:
    """One request inside the scheduler; `cancelled` is set from the event loop, read by the thread.

    `channel` is where the scheduler's `deliver` function hands this request's Deltas (a
    DeltaChannel in the service process); `inputs` carries a vision prompt's pixel values. A
    preempted sequence keeps its `generated` tokens and is prefilled again with them (`context()`),
    its sampler and output stream untouched, so its stream continues where it was.
    """

    request_id: str
    prompt_ids: list[int]
    sampler: RequestSampler
    output: OutputStream
    channel: Any
    arrival_s: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    num_prefilled: int = 0
    next_token: int = -1
    last_token_s: float = 0.0
    seq_id: int = field(default_factory=itertools.count().__next__)  # unique; request ids may repeat
    inputs: dict[str, Any] | None = None
    generated: list[int] = field(default_factory=list)
    cached: int = 0  # prompt tokens whose KV came from the prefix cache
    # Prefix caching of a vision prompt: its images' digest roots its blocks' hash chain (0: text, or
    # images it may not cache); `image_end` is the token after its last image token.
    prefix_salt: int = 0
    image_end: int = 0

    def context(self) -> list[int]:
        """The tokens a prefill computes: the prompt, and after a preemption what was generated."""
        return self.prompt_ids + self.generated if self.generated else self.prompt_ids


def stream_token(seq: Sequence, token: int, metrics: Any) -> Delta:
    """Push a chosen token through the sequence's output (text, stop strings, EOS ids, max_tokens) and
    record its latencies; the Delta's finish_reason says whether the sequence ended."""
    seq.generated.append(token)
    seq.next_token = token
    now = time.monotonic()
    metrics.generation_tokens.inc()
    if seq.last_token_s:
        metrics.itl.observe(now - seq.last_token_s)
    else:
        metrics.ttft.observe(now - seq.arrival_s)
    seq.last_token_s = now
    delta = seq.output.push(token, seq.sampler.pop_logprob())
    if delta.finish_reason is not None:
        metrics.e2e.observe(now - seq.arrival_s)
        metrics.finished(delta.finish_reason)
    return delta
