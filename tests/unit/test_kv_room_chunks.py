"""The KV pool's room around prompts prefilled in chunks, found by differential fuzzing (a small pool
with the prefix cache and chunked prefill against a roomy pool without them): the greedy answers must
be the same, and no step may fail."""

from __future__ import annotations

import pytest
from stepper import Stepper

A = [(3 * i) % 900 + 5 for i in range(39)]
B = [(7 * i) % 997 + 3 for i in range(137)]  # chunked at a 96-token budget: 57 + 80
C = [(11 * i) % 991 + 2 for i in range(10)]
D = [(13 * i) % 989 + 4 for i in range(112)]


def small_and_roomy(model, prompts, max_tokens, prefix_caching, pool, **limits):
    small = Stepper(model, kv_cache_tokens=pool, prefix_caching=prefix_caching, **limits)
    got = small.finish(small.submit(*prompts, max_tokens=max_tokens), steps=200)
    roomy = Stepper(model, kv_cache_tokens=8192, prefix_caching=False, **limits)
    return small, got, roomy.finish(roomy.submit(*prompts, max_tokens=max_tokens), steps=200)


@pytest.mark.parametrize(
    ("third", "prefix_caching"), [(A, True), (C, True), (C, False)], ids=["cache-hit", "short", "no-cache"]
)
def test_prompts_beside_a_completing_chunk_count_its_length(text_model, third, prefix_caching) -> None:
    """Step 1 takes A whole and B's first chunk; step 2 B's last chunk and `third`. The room for
    `third`'s row is counted at B's length (137 tokens: 192 wide), not only its own."""
    small, got, want = small_and_roomy(
        text_model, [A, B, third], 8, prefix_caching, pool=515, max_num_seqs=4, max_num_batched_tokens=96
    )
    assert not small.errors
    assert got == want


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_a_first_chunk_counts_the_complete_prompts_beside_it(text_model, prefix_caching) -> None:
    """B goes whole and D starts in chunks in the same step: D's row is counted at B's width."""
    small, got, want = small_and_roomy(
        text_model, [B, D], 4, prefix_caching, pool=320, max_num_seqs=4, max_num_batched_tokens=160
    )
    assert not small.errors
    assert got == want


def six_rows(model, pool: int, caching: bool, budget: int) -> Stepper:
    return Stepper(
        model, max_num_seqs=6, kv_cache_tokens=pool, max_num_batched_tokens=budget, prefix_caching=caching
    )


X = [(5 * i) % 977 + 3 for i in range(200)]
L = [(7 * i) % 997 + 3 for i in range(240)]
SHORTS = [[11 * k + 1, 11 * k + 2] for k in range(4)]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_a_chunked_prompts_room_holds_while_rows_join_and_grow(text_model, prefix_caching) -> None:
    """X runs; four 2-token prompts and L (240 tokens) arrive at a 32-token budget. With five rows
    running, later steps give L's chunks less than this step did: L's room is counted at that slower
    pace, so the running rows' growth while its chunks come still fits the pool (mixed steps never
    preempt)."""

    def run(pool: int, caching: bool):
        stepper = six_rows(text_model, pool, caching, budget=32)
        seqs = stepper.submit(X, max_tokens=60)
        for _ in range(100):  # X's prefill, then decode steps until its row holds 247 tokens
            if stepper.runner.kv.lengths[0] == 247:
                break
            stepper.step()
        assert stepper.runner.kv.lengths[0] == 247
        seqs += stepper.submit(*SHORTS, L, max_tokens=20)
        return stepper, stepper.finish(seqs, steps=200)

    small, got = run(1600, prefix_caching)
    assert not small.errors
    assert got == run(8192, False)[1]


LONG = [(3 * i) % 900 + 5 for i in range(400)]
P = [(7 * i) % 997 + 3 for i in range(137)]
Q = [(11 * i) % 991 + 2 for i in range(57)]


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_a_first_chunk_beside_a_longer_complete_prompt_keeps_its_kv(text_model, prefix_caching) -> None:
    """LONG leaves the rows 448 wide; then P goes whole and Q starts in chunks in one packed prefill.
    Q's row is laid out at least as wide as the step's layout (P's row is not loaded yet when Q's row
    is placed), and its chunk's length is known before P's load lays the pool out again: Q keeps its
    KV and answers as in a roomy pool (it used to answer wrong, silently)."""

    def answers(pool: int, caching: bool):
        stepper = six_rows(text_model, pool, caching, budget=160)
        stepper.run(LONG, max_tokens=1)
        return stepper, stepper.run(P, Q, max_tokens=4)

    small, got = answers(600, prefix_caching)
    assert not small.errors
    assert got == answers(8192, False)[1]


def test_rows_that_do_not_fit_are_refused_before_anything_is_written(text_model) -> None:
    """The pool's own check: a layout whose rows would not fit beside the cached blocks raises, and the
    rows and blocks stay as they were."""
    stepper = Stepper(text_model, max_num_seqs=4, kv_cache_tokens=320)
    stepper.run(P)
    kv = stepper.runner.kv
    before = (kv.width, kv.prefix_blocks, list(kv.lengths))
    with pytest.raises(ValueError, match="do not fit a 320-token pool beside"):
        kv.fit(2, 300)
    assert (kv.width, kv.prefix_blocks, list(kv.lengths)) == before
