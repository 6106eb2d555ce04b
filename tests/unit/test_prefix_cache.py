"""Prefix caching: full blocks of earlier prompts and answers reused, LRU eviction, same greedy tokens."""

from __future__ import annotations

import asyncio

from inprocess import InProcessEngine
from prometheus_client import REGISTRY

from shardbento.catalog import ServingLimits
from shardbento.engine.base import ChatMessage, SamplingParams
from shardbento.engine.batch.kvslots import PREFIX_BLOCK
from shardbento.engine.batch.prefix import PrefixIndex

B = PREFIX_BLOCK
SYSTEM = "You are the sharded bento's helpful assistant. Answer briefly and exactly. " * 6


def test_prefix_index_matches_whole_blocks_of_a_chain_and_leaves_one_token() -> None:
    index = PrefixIndex()
    tokens = list(range(3 * B + 5))
    assert index.add(tokens, lambda n: True) == [(0, 0), (1, 1), (2, 2)]
    assert index.match(tokens) == [0, 1, 2]
    assert index.match(tokens[: 2 * B + 1]) == [0, 1]
    assert index.match(tokens[: 2 * B]) == [0]  # one token must stay to compute
    assert index.match([7, *tokens[1:]]) == []  # a different first block: nothing after it matches
    assert index.add(tokens, lambda n: True) == []  # cached already


def test_prefix_index_evicts_least_recent_leaves_first_and_stays_contiguous() -> None:
    index = PrefixIndex()
    first, second = list(range(2 * B)), list(range(1000, 1000 + 2 * B))
    index.add(first, lambda n: True)  # blocks 0, 1
    index.add(second, lambda n: True)  # blocks 2, 3
    index.match([*first, 1])  # first is the most recent now
    moves = index.evict(1)
    assert len(index) == 3
    assert index.match([*second, 1]) == [2]  # second's leaf went, its root stayed
    assert moves == [(3, 3)] or moves == []  # the last block leaves: nothing to move
    moves = index.evict(1, keep=frozenset({2}))  # second's root is kept: first's leaf goes
    assert moves == [(2, 1)]  # the last block fills the gap
    assert index.match([*second, 1]) == [1] and index.match([*first, 1]) == [0]
    assert index.add(list(range(5000, 5000 + 4 * B)), lambda n: n <= 4) == [(0, 2), (1, 3)]


def test_prefix_index_copies_a_block_that_fills_two_gaps_once_and_follow_moves_finds_it() -> None:
    """Eviction keeps the cache contiguous, the last block filling each gap: a block that fills one gap
    and then, the last again, another is copied once, to where it ends; a kept block can be that block,
    and a planned chunk's prefix follows it."""
    from shardbento.engine.batch.prefill import PrefillChunk
    from shardbento.engine.batch.prefix import follow_moves

    index = PrefixIndex()
    prompts = [list(range(n * 100, n * 100 + B)) for n in range(4)]
    for tokens in prompts:
        index.add(tokens, lambda n: True)  # blocks 0..3, in order
    for n in (1, 0):
        index.match([*prompts[n], 1])  # least recent first now: 2, 3 (kept), 1, 0
    moves = index.evict(2, keep=frozenset({3}))
    assert moves == [(3, 1)]  # block 3 filled gap 2, then (the last again) gap 1: one copy
    assert index.cached(prompts[3])[0] == [1] and index.cached(prompts[0])[0] == [0]
    planned = [(PrefillChunk(1, (7,), B, 0, prefix=(0, 3)), ["group"])]
    [(chunk, group)] = follow_moves(planned, moves)
    assert chunk.prefix == (0, 1) and group == ["group"]
    assert follow_moves(planned, []) is planned


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(f"shardbento:{name}", {"model_name": "tiny-llama"}) or 0.0


def engine_with(loaded, **limits) -> InProcessEngine:
    return InProcessEngine(loaded, ServingLimits(**limits))


def conversation(engine, turns: int, max_tokens: int = 12) -> list[str]:
    """Greedy multi-turn chat: each turn's prompt carries the system prompt and every earlier turn."""

    async def run():
        messages = [ChatMessage(role="system", text=SYSTEM)]
        answers = []
        for turn in range(turns):
            messages.append(ChatMessage(role="user", text=f"Question {turn}: what next?"))
            prompt = engine.render_chat(messages)
            deltas = [d async for d in engine.stream(prompt, SamplingParams(max_tokens=max_tokens), "chat")]
            answers.append("".join(d.text for d in deltas))
            messages.append(ChatMessage(role="assistant", text=answers[-1]))
        return answers

    return asyncio.run(run())


def test_prefix_cache_multi_turn_reuses_earlier_turns_with_the_same_greedy_text(text_model) -> None:
    cached = engine_with(text_model, prefix_caching=True)
    plain = engine_with(text_model, prefix_caching=False)
    hits, queries = metric("prefix_cache_hits_total"), metric("prefix_cache_queries_total")
    try:
        with_cache = conversation(cached, 4)
        reused = metric("prefix_cache_hits_total") - hits
        asked = metric("prefix_cache_queries_total") - queries
        without = conversation(plain, 4)
    finally:
        cached.close()
        plain.close()
    assert with_cache == without
    system_blocks = len(cached.render_chat([ChatMessage(role="system", text=SYSTEM)]).token_ids) // B
    assert reused >= 3 * system_blocks * B  # turns 2-4 each reuse at least the system prompt
    assert reused < asked


def test_prefix_cache_evicts_under_pool_pressure_and_stays_correct(text_model) -> None:
    """A pool too small to keep every prompt: old blocks are evicted, new prompts still hit their own
    cached prefix, and answers equal an uncached engine's."""
    prompts = [
        text_model.prompts.encode(f"Topic {i}: " + "the bento shards every layer " * 10) for i in range(8)
    ]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    pool = 4 * max(p.num_tokens + params.max_tokens for p in prompts)
    small = engine_with(text_model, kv_cache_tokens=pool)

    async def run(engine):
        out = []
        for prompt in [*prompts, *prompts[-2:]]:  # the last two again: their blocks are the newest
            deltas = [d async for d in engine.stream(prompt, params, "evict")]
            out.append([t for d in deltas for t in d.token_ids])
        return out

    hits = metric("prefix_cache_hits_total")
    try:
        got = asyncio.run(run(small))
        index = small.scheduler._prefix.index
        kv = small.runner.kv
        assert len(index) * B <= pool and kv.prefix_blocks == len(index)
        assert len(index) < sum(p.num_tokens // B for p in prompts)  # not everything could stay
    finally:
        small.close()
    assert metric("prefix_cache_hits_total") - hits >= 2 * (prompts[-1].num_tokens // B - 1) * B
    plain = engine_with(text_model, prefix_caching=False)
    try:
        assert got == asyncio.run(run(plain))
    finally:
        plain.close()


def test_prefix_cache_hits_of_different_lengths_prefill_together(text_model) -> None:
    """Prompts whose cached prefixes differ in length, and a fresh one, in one batched prefill: the
    same greedy tokens as an engine without the cache."""
    bases = [SYSTEM[: 120 * (i + 1)] for i in range(3)]
    warm = [text_model.prompts.encode(f"{base} First question?") for base in bases]
    later = [
        text_model.prompts.encode(f"{base} Second, longer question {i}?") for i, base in enumerate(bases)
    ]
    later.append(text_model.prompts.encode("A prompt nobody sent before, fresh."))
    params = SamplingParams(max_tokens=8, ignore_eos=True)

    async def together(engine, prompts):
        async def one(prompt):
            return [t async for d in engine.stream(prompt, params, "together") for t in d.token_ids]

        return await asyncio.gather(*(one(p) for p in prompts))

    cached, plain = engine_with(text_model), engine_with(text_model, prefix_caching=False)
    try:
        asyncio.run(together(cached, warm))
        runner = cached.runner
        calls: list[list[int]] = []
        prefill = runner.prefill
        runner.prefill = lambda chunks: calls.append([c.start for c in chunks]) or prefill(chunks)
        got = asyncio.run(together(cached, later))
        expected = asyncio.run(together(plain, later))
    finally:
        cached.close()
        plain.close()
    assert got == expected
    assert any(len(starts) > 1 and any(starts) for starts in calls), calls  # hits batched, not alone


def test_prefix_cache_chunks_read_kept_blocks_where_eviction_moved_them(text_model, monkeypatch) -> None:
    """Two prompts join in one step and need room: eviction keeps the blocks one of them hits (the
    newest, at the cache's far end) but moves them into the evicted blocks' places. The step's chunk
    reads its prefix where the blocks are now, and the answers equal an uncached engine's."""
    from shardbento.engine.base import DeltaChannel
    from shardbento.engine.batch.kvslots import BLOCK

    moved_kept = []
    evict = PrefixIndex.evict

    def spy(self, count, keep=frozenset()):
        moves = evict(self, count, keep)
        moved_kept.extend(move for move in moves if move[0] in keep)
        return moves

    monkeypatch.setattr(PrefixIndex, "evict", spy)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    first, second = list(range(100, 160)), list(range(300, 370))  # token ids: sizes exact

    follow_up: list[int] = []  # the second prompt, its answer and more: it hits the second's blocks

    def run(engine):
        async def one(ids):
            prompt = engine.encode(ids)
            return [t async for d in engine.stream(prompt, params, "one") for t in d.token_ids]

        async def together(*prompts):  # queued at once: they join in the same step
            seqs = [
                engine.make_sequence.sequence(f"t{i}", engine.encode(ids), params, DeltaChannel())
                for i, ids in enumerate(prompts)
            ]
            engine.scheduler.submit(*seqs)
            return [[t async for d in seq.channel.deltas() for t in d.token_ids] for seq in seqs]

        async def conversation():
            answers = [await one(first), await one(second)]
            follow_up[:] = [*second, *answers[1], *range(500, 540)]
            return [*answers, *(await together(follow_up, list(range(700, 790))))]

        return asyncio.run(conversation())

    cached = engine_with(text_model, kv_cache_tokens=5 * BLOCK, max_num_seqs=4)
    reads: list[tuple[tuple[int, ...], list[int]]] = []
    index = cached.scheduler._prefix.index
    runner = cached.runner
    for name in ("prefill", "mixed"):
        method = getattr(runner, name)

        def checked(chunks, *args, _method=method):
            for chunk in chunks:  # only the follow-up hits: what it reads must hold its first tokens now
                if chunk.prefix:
                    reads.append((chunk.prefix, index.cached(follow_up[: len(chunk.prefix) * B])[0]))
            return _method(chunks, *args)

        setattr(runner, name, checked)
    try:
        got = run(cached)
    finally:
        cached.close()
    plain = engine_with(text_model, kv_cache_tokens=5 * BLOCK, max_num_seqs=4, prefix_caching=False)
    try:
        assert got == run(plain)
    finally:
        plain.close()
    assert moved_kept, "no kept block moved: the case this test is about did not happen"
    assert reads and all(list(prefix) == held for prefix, held in reads), reads
