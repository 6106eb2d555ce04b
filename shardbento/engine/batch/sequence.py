"""A request inside the scheduler, and the pure planning helpers the scheduler uses on them."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from shardbento.engine.base import Delta
from shardbento.engine.batch.kvslots import PREFIX_BLOCK
from shardbento.engine.batch.runner import PrefillChunk
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


def is_twin(seq: Sequence) -> bool:
    """Whether the sequence may share another's prefill: a fresh text prompt."""
    return seq.inputs is None and not seq.num_prefilled and not seq.generated


def join_twins(
    planned: list[tuple[PrefillChunk, list[Sequence]]],
    candidates: list[Sequence],
    room: Callable[[int, int], bool],
) -> None:
    """Add each waiting fresh text prompt equal to a prompt completed by a planned chunk to its group,
    while the KV pool holds one more row."""
    completing = {
        tuple(group[0].prompt_ids): group
        for chunk, group in planned
        if chunk.slot is not None and chunk.inputs is None and not group[0].generated
    }
    taken = {id(group[0]) for _, group in planned}
    rows = sum(len(group) for chunk, group in planned if chunk.slot is not None)
    longest = max((len(group[0].context()) for _, group in planned), default=0)
    for seq in candidates:
        if id(seq) in taken or not is_twin(seq):
            continue
        group = completing.get(tuple(seq.prompt_ids))
        if group is not None and room(rows + 1, longest):
            group.append(seq)
            rows += 1


def plan_together(
    candidates: list[Sequence],
    hit_of: Callable[[int], list[int]],
    budget: int,
    room: Callable[[int, int], bool],
    keep: set[int],
    packs: bool,
) -> list[tuple[PrefillChunk, list[Sequence]]]:
    """Prompts prefilled together in one forward (`hit_of(i)`: candidate i's cached blocks, looked up
    only for the candidates considered). Packed, each computes its own remainder past its cached prefix and the budget counts
    their sum; left-padded, each row computes the same number of tokens (the batch's widest remainder):
    a row with a longer cached prefix takes only as much of it as leaves that many tokens to compute."""
    chosen: list[tuple[Sequence, list[int]]] = []
    width = longest = total = 0
    prompts = set()
    for index, seq in enumerate(candidates):
        context = seq.context()
        if tuple(context) in prompts and is_twin(seq):
            continue  # a twin: join_twins adds it
        prompts.add(tuple(context))
        if seq.inputs is not None or seq.num_prefilled:
            break  # a vision prompt goes alone, as the head (with or without a cached prefix)
        blocks = hit_of(index)
        remainder = len(context) - len(blocks) * PREFIX_BLOCK
        wider = max(width, remainder)
        cost = total + remainder if packs else wider * (len(chosen) + 1)
        if cost > budget or not room(len(chosen) + 1, max(longest, len(context))):
            break
        width, longest, total = wider, max(longest, len(context)), total + remainder
        keep.update(blocks)
        chosen.append((seq, blocks))
    planned = []
    for seq, blocks in chosen:
        context = seq.context()
        start = len(blocks) * PREFIX_BLOCK
        if not packs:
            start = min(start, max(0, len(context) - width))
        prefix = tuple(blocks[: -(-start // PREFIX_BLOCK)]) if start else ()
        seq.cached = start
        planned.append((PrefillChunk(seq.seq_id, tuple(context[start:]), start, 0, prefix=prefix), [seq]))
    return planned


def with_generated(inputs: dict[str, Any], generated: list[int]) -> dict[str, Any]:
    """A vision prompt's processor outputs with a preempted sequence's generated tokens appended."""
    if not generated:
        return inputs
    extra = torch.tensor([generated], dtype=inputs["input_ids"].dtype)
    resumed = dict(inputs, input_ids=torch.cat([inputs["input_ids"], extra], dim=-1))
    if "attention_mask" in inputs:
        resumed["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], dim=-1)
    return resumed


def place(planned: list[tuple[PrefillChunk, list[Sequence]]], first_slot: int) -> list[PrefillChunk]:
    """Give every completing chunk its slots, in the order the scheduler appends the sequences."""
    chunks = []
    slot = first_slot
    for chunk, group in planned:
        if chunk.slot is None:
            chunks.append(chunk)
            continue
        chunks.append(replace(chunk, slot=slot, copies=tuple(range(slot + 1, slot + len(group)))))
        slot += len(group)
    return chunks


def head_chunk(seq: Sequence, budget: int, hit: list[int]) -> PrefillChunk:
    """The next chunk of a prompt that runs alone: a vision prompt whole, a long one `budget` at a
    time, one with a cached prefix from its end; `slot` is set (to be placed) on the chunk that
    completes the prompt."""
    context = seq.context()
    if seq.inputs is not None and not hit and not seq.num_prefilled:  # pixels in the same forward
        return PrefillChunk(seq.seq_id, tuple(context), 0, 0, with_generated(seq.inputs, seq.generated))
    start = len(hit) * PREFIX_BLOCK if hit else seq.num_prefilled
    if hit:
        seq.cached = start
    take = context[start : start + budget]
    done = start + len(take) == len(context)
    return PrefillChunk(
        seq.seq_id, tuple(take), start, 0 if done else None, prefix=tuple(hit), length=len(context)
    )


def mixable(chunk: PrefillChunk) -> bool:
    """A chunk that completes a text prompt from its start or a cached prefix (not a vision prompt, not
    the next chunk of a long one): what a mixed step packs."""
    return chunk.slot is not None and chunk.inputs is None and (chunk.start == 0 or bool(chunk.prefix))
