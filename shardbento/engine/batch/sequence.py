"""A request inside the scheduler, and the pure planning helpers the scheduler uses on them."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shardbento.engine.base import Delta, TokenLogprob
from shardbento.engine.batch.sampler import RequestSampler
from shardbento.engine.batch.scoring import Score
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
    adapter: int = 0  # the LoRA adapter's id on rank 0 (0: the base model); its salt is in prefix_salt
    lora_slot: int = -1  # the adapter's device slot while the sequence is admitted (-1: none)
    # Prompt logprobs: asked with this many alternatives and not yet computed (the prompt then goes
    # without a cached prefix, logits kept at every token); once computed, held for the first Delta.
    scoring: int | None = None
    prompt_logprobs: list[TokenLogprob] | None = None

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
    if seq.prompt_logprobs is not None:
        delta.prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None
    if delta.finish_reason is not None:
        metrics.e2e.observe(now - seq.arrival_s)
        metrics.finished(delta.finish_reason)
    return delta


def prompt_logprobs(scores: list[Score], top: int, text: Callable[[int], str]) -> list[TokenLogprob]:
    """A prompt's scores (runner.take_scores) as TokenLogprobs with their tokens' text, `top` best each."""
    return [
        TokenLogprob(
            text(token_id),
            logprob,
            tuple((text(i), lp) for i, lp in zip(ids[:top], lps[:top], strict=True)),
            token_id=token_id,
            rank=rank,
            top_ids=ids[:top],
        )
        for token_id, logprob, rank, ids, lps in scores
    ]


def attach_scores(group: list[Sequence], scores: list[Score] | Exception) -> list[Sequence]:
    """Give the prompt logprobs the runner computed for a group's prefill to each sequence that asked
    (their first Delta carries them). If computing them failed (`scores` is the exception), those
    sequences are cancelled (they leave the batch at the next step) and returned, to fail with it."""
    failed = []
    for seq in (seq for seq in group if seq.scoring is not None):
        if isinstance(scores, Exception):
            seq.cancelled = True
            failed.append(seq)
        else:
            seq.prompt_logprobs = prompt_logprobs(scores, seq.scoring, seq.sampler.token_text)
        seq.scoring = None
    return failed
