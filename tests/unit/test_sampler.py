"""Batched token selection: the batch's picks equal each row's own sampler, tiny temperatures stay greedy."""

from __future__ import annotations

import torch

from shardbento.engine.base import SamplingParams
from shardbento.engine.batch.sampler import RequestSampler, select_tokens


def samplers(eos: set[int]) -> list[RequestSampler]:
    params = [
        SamplingParams(max_tokens=4),
        SamplingParams(max_tokens=4, min_tokens=2),
        SamplingParams(max_tokens=4, temperature=0.8, seed=3),
        SamplingParams(max_tokens=4, logprobs=2),
        SamplingParams(max_tokens=4, repetition_penalty=1.3),
    ]
    return [RequestSampler(p, eos_ids=eos, decode=str) for p in params]


def test_sampler_select_tokens_equals_selecting_row_by_row() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    favourite = int(logits[1].argmax())
    eos = {favourite, 49}  # row 1's favourite token is an EOS it must not pick yet (min_tokens=2)
    histories = [None, None, None, None, [1, 2, int(logits[4].argmax())]]
    batched = select_tokens(samplers(eos), logits, histories)
    one_by_one = [s.select(logits[i], histories[i]) for i, s in enumerate(samplers(eos))]
    assert batched == one_by_one
    assert batched[1] != favourite and int(logits[1].argmax()) == favourite  # logits left untouched


def test_sampler_tiny_temperature_is_greedy_not_overflow() -> None:
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1)) * 30
    tiny = [
        RequestSampler(SamplingParams(max_tokens=2, temperature=t), eos_ids=set(), decode=str)
        for t in (2.2e-308, 1e-6)
    ]
    assert select_tokens(tiny, logits, [None, None]) == logits.argmax(-1).tolist()
