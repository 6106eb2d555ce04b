"""The KV pool's room, step by step: the rows a step adds (a chunked prompt's row, twins, prompts with
cache hits) are counted before the rows are laid out, so rows never overwrite cached prefix blocks
and never run past the pool; a failed step leaves no rows behind. Each case compares greedy answers
with an engine that has room to spare or no prefix cache."""

from __future__ import annotations

import pytest
import torch
from stepper import Stepper
from transformers import DynamicCache

from shardbento.engine.batch.kvslots import PREFIX_BLOCK

SHORT = [[(40 * i + j) % 1000 + 1 for j in range(60)] for i in range(20)]  # token ids: sizes exact
LONG = [(7 * i) % 997 + 3 for i in range(300)]  # chunked at a 256-token budget
A = list(range(10, 30))
B = [(5 * i) % 900 + 40 for i in range(100)]  # chunked at a 64-token budget


def watch_layouts(stepper: Stepper) -> list[bool]:
    """After every layout of the pool's rows: whether they reach into the cached blocks."""
    seen: list[bool] = []
    fit = stepper.runner.kv.fit

    def checked(rows: int, longest: int) -> None:
        fit(rows, longest)
        seen.append(stepper.rows_over_cached_blocks())

    stepper.runner.kv.fit = checked
    return seen


def cached_kv_error(stepper: Stepper, prompt: list[int]) -> float:
    """The largest difference between the cached blocks of `prompt` and its keys computed afresh."""
    blocks, _ = stepper.scheduler._prefix.index.cached(prompt)
    if not blocks:
        return 0.0
    cache = DynamicCache(config=stepper.runner.model.config)
    with torch.inference_mode():
        stepper.runner.model(
            input_ids=torch.tensor([prompt[: len(blocks) * PREFIX_BLOCK]]),
            past_key_values=cache,
            use_cache=True,
        )
        return max(
            (stepper.runner.kv.prefix(i, blocks)[0][0] - cache.layers[i].keys[0]).abs().max().item()
            for i in stepper.runner.kv.layer_indices()
        )


def test_a_chunked_prompts_first_row_makes_room_in_the_cache(text_model) -> None:
    """A long prompt starting in chunks takes a row beside a cache that fills the pool: blocks are
    evicted for that row, the cached ones stay right, and later hits answer as without a cache."""

    def after_long_prompt(prefix_caching: bool) -> tuple[Stepper, list, list[bool]]:
        stepper = Stepper(
            text_model,
            max_num_seqs=16,
            kv_cache_tokens=1024,
            prefix_caching=prefix_caching,
            max_num_batched_tokens=256,
        )
        seen = watch_layouts(stepper)
        for prompt in SHORT:
            stepper.run(prompt)
        long = stepper.submit(LONG)
        stepper.step()
        assert stepper.scheduler._chunking is long[0]  # the case: LONG starts in chunks
        stepper.finish(long)
        return stepper, [stepper.run([*p[:50], 999, 998, 997])[0] for p in SHORT[-6:]], seen

    cached, answers, seen = after_long_prompt(True)
    assert cached.scheduler._prefix.index and not any(seen)
    assert max(cached_kv_error(cached, p) for p in SHORT) < 1e-4
    assert answers == after_long_prompt(False)[1]


def test_twins_leave_a_chunked_prompts_row_its_room(text_model) -> None:
    """Twins (one prompt asked twice) and a long prompt starting in chunks in one step of a small pool:
    all finish, with the answers each gets in a roomy pool."""
    small = Stepper(text_model, max_num_seqs=4, kv_cache_tokens=256, max_num_batched_tokens=64)
    got = small.finish(small.submit(A, A) + small.submit(B))
    roomy = Stepper(text_model, max_num_seqs=4, kv_cache_tokens=1024, max_num_batched_tokens=64)
    assert not small.errors
    assert got == [*roomy.run(A, A), *roomy.run(B)]


def test_a_failed_step_leaves_no_rows_behind(text_model) -> None:
    """A step fails after laying out its rows and starting a chunked prompt's row: the request it was
    computing gets the error, and the prompt queued beside it answers as it would alone."""
    alone = Stepper(text_model, max_num_seqs=4, kv_cache_tokens=1024, max_num_batched_tokens=64).run(B)
    stepper = Stepper(text_model, max_num_seqs=4, kv_cache_tokens=1024, max_num_batched_tokens=64)
    row_chunk, failed = stepper.runner._row_chunk, []

    def fails_once(chunk):  # as an out-of-memory error in the step's forward would
        row = row_chunk(chunk)
        if not failed:
            failed.append(chunk.seq_id)
            raise RuntimeError("injected failure")
        return row

    stepper.runner._row_chunk = fails_once
    first, second = stepper.finish(stepper.submit(A) + stepper.submit(B))
    assert failed and len(stepper.errors) == 1 and first[0] == "error"
    assert [second] == alone


P = [(11 * i) % 997 + 2 for i in range(150)]  # cached: 9 blocks, filling the pool beside its row


def test_a_prompt_that_fits_only_without_its_cache_hit_is_served(text_model) -> None:
    """Nothing runs and the prompt at the head of the queue fits the pool only if the blocks it would
    reuse are evicted: it goes without them (it never waits forever), as an uncached engine answers."""
    longer = [*P[:128], *[(13 * i) % 991 + 5 for i in range(72)]]  # hits P's first 8 blocks
    answers = []
    for prefix_caching in (True, False):
        stepper = Stepper(text_model, max_num_seqs=4, kv_cache_tokens=320, prefix_caching=prefix_caching)
        stepper.run(P)
        assert not prefix_caching or stepper.runner.kv.prefix_blocks * PREFIX_BLOCK + 256 > 320
        answers.append(stepper.run(longer, max_tokens=1, steps=50))  # bounded: it used to wait forever
    assert answers[0] == answers[1] and answers[0][0]


def test_a_later_prompts_cache_hit_counts_when_it_joins(text_model) -> None:
    """A fresh prompt and one that reuses cached blocks join in one step: the room for the second row
    counts the blocks it reads, so rows are not laid over cached blocks, and a later hit on those
    blocks answers as an uncached engine does."""
    fresh = [(17 * i) % 983 + 7 for i in range(10)]
    hitting = [*P[:112], *[(19 * i) % 977 + 3 for i in range(10)]]  # reuses P's first 7 blocks

    def answers(prefix_caching: bool) -> tuple[list, list[bool]]:
        stepper = Stepper(text_model, max_num_seqs=4, kv_cache_tokens=320, prefix_caching=prefix_caching)
        seen = watch_layouts(stepper)
        out = stepper.run(P)
        out += stepper.finish(stepper.submit(fresh, max_tokens=1) + stepper.submit(hitting, max_tokens=1))
        return [*out, *stepper.run(P)], seen

    (cached, seen), (plain, _) = answers(True), answers(False)
    assert not any(seen)
    assert cached == plain


def test_a_planned_step_whose_rows_do_not_fit_beside_its_blocks_is_refused(text_model) -> None:
    """The scheduler's last check before the rows are laid out: rows that fit the pool only over the
    cached blocks the step reads raise (the step fails visibly) instead of overwriting them; for
    preemption's call (not strict) nothing is evicted and nothing raised."""
    stepper = Stepper(text_model, max_num_seqs=4, kv_cache_tokens=320)
    stepper.run(P)
    prefix, kv = stepper.scheduler._prefix, stepper.runner.kv
    every = frozenset(range(kv.prefix_blocks))
    assert not kv.holds(1, 256) and kv.holds(1, 256, prefix_blocks=0)
    with pytest.raises(RuntimeError, match="do not fit the KV pool beside"):
        prefix.make_room(1, 256, every, strict=True)
    assert prefix.make_room(1, 256, every) == [] and kv.prefix_blocks == len(every)


def test_cached_blocks_go_before_any_running_sequence_is_preempted(text_model) -> None:
    """Eight short rows outgrow their width together in a pool that cannot hold them all: sequences
    are preempted only while the rows would not fit even with every cached block evicted, and the
    answers equal a roomy pool's."""
    prompts = [[(37 * i + 11 * j) % 990 + 5 for j in range(40)] for i in range(8)]
    stepper = Stepper(text_model, max_num_seqs=8, kv_cache_tokens=640)
    kv, preempt = stepper.runner.kv, stepper.scheduler._preempt
    needless: list[tuple[int, int]] = []
    preempted = []

    def checked() -> None:
        before = len(stepper.scheduler._running)
        longest = max(kv.lengths[:before], default=0) + 1
        preempt()
        after = len(stepper.scheduler._running)
        if after < before:
            preempted.append(before - after)
            if kv.holds(after + 1, longest, prefix_blocks=0):  # one more row fit once blocks were gone
                needless.append((before, after))

    stepper.scheduler._preempt = checked
    got = stepper.run(*prompts, max_tokens=40)
    roomy = Stepper(text_model, max_num_seqs=8, kv_cache_tokens=8192).run(*prompts, max_tokens=40)
    assert preempted and not needless, (preempted, needless)
    assert got == roomy


def test_a_lone_growing_sequence_makes_room_in_the_cache(text_model) -> None:
    """One running sequence outgrows its row's width beside cached blocks: blocks are evicted for it
    (rows never reach into the cache), and a later hit on what stays answers as without a cache."""
    fresh = [(23 * i) % 971 + 9 for i in range(100)]
    answers = []
    for prefix_caching in (True, False):
        stepper = Stepper(text_model, max_num_seqs=4, kv_cache_tokens=320, prefix_caching=prefix_caching)
        seen = watch_layouts(stepper)
        out = stepper.run(P) + stepper.run(fresh, max_tokens=150) + stepper.run(P)
        answers.append(out)
        assert not any(seen)
    assert answers[0] == answers[1]
