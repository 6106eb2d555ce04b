"""Differential fuzzing of the KV pool's room, seeded and bounded: with a small pool, the prefix cache
and chunked prefill, every request answers as in a roomy pool without them (greedy), no step fails,
nothing waits forever, and rows never reach into the cached blocks. Each seed is one scenario: prompts
sharing prefixes, later turns of earlier prompts, twins, long and very short prompts, arriving in
groups some steps apart."""

from __future__ import annotations

import random
from typing import Any

import pytest
from stepper import Stepper, answer

MAX_STEPS = 3000  # a scenario's bound: far more than any of them needs


def tokens(rng: random.Random, n: int) -> list[int]:
    return [
        rng.randrange(4, 1000) for _ in range(n)
    ]  # within both models' vocabularies, past llava's image id


def scenario(seed: int) -> tuple[int, dict[str, int], list[tuple[int, list[list[int]], int]]]:
    """(pool tokens, limits, events): each event waits some steps, then submits its prompts together."""
    rng = random.Random(seed)
    pool = rng.randrange(400, 1001)
    limits = {
        "max_num_seqs": rng.randrange(2, 7),
        "max_num_batched_tokens": rng.choice([16, 32, 48, 64, 128, 256]),
    }
    shared = [tokens(rng, rng.randrange(16, 200)) for _ in range(rng.randrange(1, 4))]
    history: list[list[int]] = []
    events = []
    for _ in range(rng.randrange(1, 6)):
        max_tokens = rng.choice([1, 2, 4, 8, rng.randrange(1, 61)])
        group: list[list[int]] = []
        for _ in range(rng.choice([1, 1, 2, 3, 4, 5])):
            kind = rng.random()
            if group and kind < 0.2:
                prompt = list(group[0])  # a twin
            elif history and kind < 0.45:
                prompt = rng.choice(history) + tokens(rng, rng.randrange(1, 60))  # a later turn
            elif kind < 0.75:
                prefix = rng.choice(shared)
                prompt = prefix[: rng.randrange(1, len(prefix) + 1)] + tokens(rng, rng.randrange(1, 150))
            else:
                prompt = tokens(rng, rng.choice([rng.randrange(1, 6), rng.randrange(5, 400)]))
            group.append(prompt[: min(pool, 460) - max_tokens - 2])  # each fits the pool alone
        history += group
        events.append((rng.choice([0, 0, 1, 2, 3, 5, 8, 20]), group, max_tokens))
    return pool, limits, events


def drive(stepper: Stepper, events: list[tuple[int, list[list[int]], int]], check: bool) -> list[Any]:
    seqs: list[Any] = []

    def step() -> None:
        stepper.step()
        if check:
            assert not stepper.errors, stepper.errors
            assert not stepper.rows_over_cached_blocks()

    for wait, group, max_tokens in events:
        for _ in range(wait):
            step()
        seqs += stepper.submit(*group, max_tokens=max_tokens)
    for _ in range(MAX_STEPS):
        if all(seq.output.finished for seq in seqs):
            break
        step()
    assert all(seq.output.finished for seq in seqs), "a request never finished"
    return [answer(seq) for seq in seqs]


@pytest.mark.parametrize("seed", range(48))
def test_a_small_pool_answers_as_a_roomy_one(text_model, seed: int) -> None:
    """tiny-llama: prompts packed, mixed steps."""
    same_answers(text_model, seed)


@pytest.mark.parametrize("seed", range(100, 124))
def test_a_small_pool_answers_as_a_roomy_one_unpacked(vision_model, seed: int) -> None:
    """tiny-llava's text prompts: left-padded prefills, a chunked prompt's row alone, no mixed steps."""
    same_answers(vision_model, seed)


def same_answers(model: Any, seed: int) -> None:
    pool, limits, events = scenario(seed)
    small_pool = Stepper(model, kv_cache_tokens=pool, **limits)
    if model.prompts.spec.kind != "text":
        assert not small_pool.runner.packs and not small_pool.runner.mixes  # the paths this case is for
    small = drive(small_pool, events, check=True)
    roomy = drive(Stepper(model, kv_cache_tokens=8192, prefix_caching=False, **limits), events, check=False)
    assert small == roomy
