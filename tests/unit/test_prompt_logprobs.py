"""Prompt logprobs on the transformers engine: every prompt token's logprob, rank and best alternatives
equal an in-process forward's log-softmax, whatever path its prefill takes (packed, left-padded, in
chunks across steps, beside running decodes, after a cached prefix was stored, as twins)."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch
from inprocess import InProcessEngine

from shardbento.catalog import ServingLimits
from shardbento.engine.base import ChatMessage, SamplingParams
from shardbento.engine.batch import planner, scoring
from shardbento.engine.batch.scoring import score_chunk
from shardbento.engine.batch.sequence import Sequence

LONG = "Tell me about the sharded bento, its many GPUs and the catalog entry that serves it. " * 4


def reference(model, token_ids: list[int], top: int) -> list[tuple]:
    """(logprob, rank, best ids, best logprobs) of tokens 1.. from one plain forward of the prompt."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([token_ids])).logits[0].float()
    logprobs = logits.log_softmax(dim=-1)
    out = []
    for position, token in enumerate(token_ids[1:]):
        row = logprobs[position]
        best = row.topk(top)
        rank = int((row > row[token]).sum()) + 1
        out.append((row[token].item(), rank, best.indices.tolist(), best.values.tolist()))
    return out


def assert_matches(items, token_ids: list[int], expected: list[tuple], top: int) -> None:
    assert [i.token_id for i in items] == token_ids
    assert items[0].logprob is None and items[0].top == ()
    for item, (logprob, rank, ids, values) in zip(items[1:], expected, strict=True):
        assert item.logprob == pytest.approx(logprob, abs=1e-4)
        assert abs(item.rank - rank) <= 1  # a near tie may swap places within the tolerance
        assert len(item.top) == len(item.top_ids) == top
        assert [lp for _, lp in item.top] == pytest.approx(values, abs=1e-4)
        assert item.top_ids[0] == ids[0] or values[0] - values[1] < 1e-4


async def first_deltas(engine, prompts, params_list):
    async def first(prompt, params):
        deltas = [d async for d in engine.stream(prompt, params, "test")]
        return deltas[0], deltas

    return await asyncio.gather(*(first(p, s) for p, s in zip(prompts, params_list, strict=True)))


def test_score_chunk_in_pieces_and_chunks_equals_one_log_softmax(monkeypatch) -> None:
    """Split across chunks (each chunk's first token scored by the previous chunk's last row) and
    normalised a few rows at a time, the scores equal one log-softmax over the whole prompt."""
    monkeypatch.setattr(scoring, "PIECE_ROWS", 3)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(11, 50, generator=generator)
    ids = tuple(torch.randint(0, 50, (11,), generator=generator).tolist())
    whole = score_chunk(logits, ids, None, 4)
    parts = score_chunk(logits[:4], ids[:4], None, 4) + score_chunk(logits[4:], ids[4:], logits[3], 4)
    assert whole[0] == (ids[0], None, 0, (), ())
    logprobs = logits.log_softmax(dim=-1)
    for position, (token, logprob, rank, best, values) in enumerate(whole[1:]):
        row = logprobs[position]
        assert token == ids[position + 1]
        assert logprob == pytest.approx(row[token].item(), abs=1e-6)
        assert rank == int((row > row[token]).sum()) + 1
        assert list(best) == row.topk(4).indices.tolist()
        assert list(values) == pytest.approx(row.topk(4).values.tolist(), abs=1e-6)
    for a, b in zip(whole, parts, strict=True):
        assert a[:3] == b[:3] and a[3] == b[3]
        assert a[4] == pytest.approx(b[4], abs=1e-6)
    assert all(s[3] == () for s in score_chunk(logits, ids, None, 0))


@pytest.mark.parametrize("packs", [True, False], ids=["packed", "left-padded"])
def test_prompt_logprobs_in_chunks_beside_decodes_and_after_a_cached_prefix(text_model, packs) -> None:
    """A step budget of 32 puts the long prompt in several chunks while another request decodes; the
    prefix cache already holds that prompt (an unscored request stored it), yet the scored one computes
    every token. Short scored prompts go together in one prefill. All equal the plain forward."""
    limits = ServingLimits(max_num_seqs=4, max_num_batched_tokens=32, prefix_caching=True)
    engine = InProcessEngine(text_model, limits)
    try:
        engine.runner.packs = engine.runner.mixes = packs
        long = engine.render_chat([ChatMessage(role="user", text=LONG)])
        short = [engine.render_chat([ChatMessage(role="user", text=t)]) for t in ("Hi.", "Why so?")]
        warm = SamplingParams(max_tokens=2, ignore_eos=True)
        asyncio.run(first_deltas(engine, [long], [warm]))  # its prompt's blocks are now cached
        assert engine.scheduler._prefix.hit(list(long.token_ids), 0)

        plain = SamplingParams(max_tokens=40, ignore_eos=True)
        scored = SamplingParams(max_tokens=3, ignore_eos=True, prompt_logprobs=2)
        results = asyncio.run(first_deltas(engine, [short[0], long, *short], [plain, scored, scored, scored]))
        assert results[0][0].prompt_logprobs is None  # only those that ask get them
        for prompt, (first, deltas) in zip([long, *short], results[1:], strict=True):
            ids = list(prompt.token_ids)
            assert_matches(first.prompt_logprobs, ids, reference(text_model.model, ids, 2), 2)
            assert all(d.prompt_logprobs is None for d in deltas[1:])
        assert len(long.token_ids) > 3 * 32  # it did go in chunks
    finally:
        engine.close()


def test_prompt_logprobs_for_every_choice_of_one_prompt(text_inprocess, text_model) -> None:
    """n choices share one prefill (twins): each gets the prompt's logprobs."""
    prompt = text_inprocess.render_chat([ChatMessage(role="user", text="Count to three.")])
    params = [SamplingParams(max_tokens=2, temperature=1.0, seed=s, prompt_logprobs=1) for s in (1, 2)]

    async def read(stream):
        return [d async for d in stream]

    async def run():
        return await asyncio.gather(*map(read, text_inprocess.stream_choices(prompt, params, "twins")))

    ids = list(prompt.token_ids)
    expected = reference(text_model.model, ids, 1)
    for deltas in asyncio.run(run()):
        assert_matches(deltas[0].prompt_logprobs, ids, expected, 1)


PROMPTS = itertools.count(1)


def seq(n: int, scoring: int | None = None, first: int | None = None) -> Sequence:
    """A waiting request of n prompt tokens (a prompt of its own unless `first` names one)."""
    first = next(PROMPTS) * 1000 if first is None else first
    s = Sequence("r", list(range(first, first + n)), sampler=None, output=None, channel=None)
    s.scoring = scoring
    return s


def test_planner_keeps_a_steps_scored_positions_within_the_bound(monkeypatch) -> None:
    """Scored prompts keep logits at every token: a step holds at most SCORED_STEP_TOKENS of them (a
    long one goes in chunks of that size), unscored prompts fill the rest of the budget."""
    monkeypatch.setattr(planner, "SCORED_STEP_TOKENS", 40)
    monkeypatch.setattr(scoring, "SCORED_STEP_TOKENS", 40)

    def plan(candidates, packs=True):
        chosen = planner.choose_chunks(candidates, lambda i: [], 256, lambda r, n, b: True, set(), packs, 0)
        return [(len(chunk.token_ids), chunk.scored, chunk.slot) for chunk, _ in chosen]

    assert plan([seq(30, 1), seq(30, 1), seq(30)]) == [
        (30, 1, 0)
    ]  # the second waits; so does the third (FIFO)
    assert plan([seq(30, 1), seq(8, 0), seq(30)]) == [(30, 1, 0), (8, 0, 0), (30, None, 0)]
    assert plan([seq(100, 2)]) == [(40, 2, None)]  # a long scored prompt: chunks of the bound
    head = seq(100, 2)
    head.num_prefilled = 80
    assert plan([head, seq(30)]) == [(20, 2, 0), (30, None, 0)]
    # Left-padded, a scored row keeps the whole batch's logits: its width times its rows count.
    assert plan([seq(15), seq(15, 1), seq(15)], packs=False) == [(15, None, 0), (15, 1, 0)]


def test_planner_twin_joins_only_a_prefill_that_scores_enough() -> None:
    first, asks_more, asks_none = seq(10, 1, first=7), seq(10, 3, first=7), seq(10, first=7)
    planned = [(planner.PrefillChunk(first.seq_id, tuple(first.prompt_ids), 0, 0, scored=1), [first])]
    planner.join_twins(planned, [first, asks_more, asks_none], lambda r, n, b: True)
    assert planned[0][1] == [first, asks_none]


def test_one_at_a_time_models_refuse_prompt_logprobs_by_name() -> None:
    """generate() keeps no prompt logits: the loop refuses the request (a 400 naming the field)."""
    from types import SimpleNamespace

    from shardbento.engine.core.generate import GenerateLoop
    from shardbento.errors import InvalidRequest

    loop = GenerateLoop(None, SimpleNamespace(), ServingLimits(), None, lambda items: [])
    with pytest.raises(InvalidRequest) as caught:
        loop.submit(seq(5, 1))
    assert caught.value.param == "prompt_logprobs"


def test_planner_counts_a_left_padded_batchs_kept_rows_and_a_scored_prompts_short_chunks(monkeypatch) -> None:
    """Left-padded, a scored row keeps the whole batch's logits: what is left of the bound for the next
    prompt's first chunk counts them all. A scored prompt's chunks are at most the bound, so the room it
    asks for covers the running rows' growth over that many steps."""
    monkeypatch.setattr(planner, "SCORED_STEP_TOKENS", 1024)
    monkeypatch.setattr(scoring, "SCORED_STEP_TOKENS", 1024)
    chosen = planner.choose_chunks(
        [seq(500), seq(10, 1), seq(3000, 1)], lambda i: [], 8192, lambda r, n, b: True, set(), False, 0
    )
    kept = max(len(c.token_ids) for c, _ in chosen[:2]) * 2 + len(chosen[2][0].token_ids)
    assert [c.scored for c, _ in chosen] == [None, 1, 1] and kept <= 1024

    asked = []
    planner.choose_chunks(
        [seq(8000, 0)], lambda i: [], 2048, lambda r, n, b: asked.append(n) or True, set(), True, 9000
    )
    assert asked[-1] == 9000 + 7  # eight chunks of 1024 (not four of 2048): the rows grow 7 more


def test_a_retried_prompt_is_scored_once_and_a_scoring_failure_fails_only_its_request(
    text_model, monkeypatch
) -> None:
    """A prompt planned again from its start (its step failed) gets its scores once, its first token's
    null; when computing scores raises, that request ends with the error and the others are served."""
    engine = InProcessEngine(text_model, ServingLimits(max_num_seqs=4))
    try:
        runner = engine.runner
        ids = (1, 5, 9, 13)
        chunk = planner.PrefillChunk(7, ids, 0, 0, scored=0)
        logits = torch.randn(4, 50)
        runner._keep_scores(chunk, logits)
        runner._keep_scores(chunk, logits)  # the same chunk again: a retried step
        scores = runner.take_scores(7)
        assert [s[0] for s in scores] == list(ids) and scores[0][1] is None

        def fail(*args):
            raise RuntimeError("scores out of memory")

        monkeypatch.setattr("shardbento.engine.batch.prefill.score_chunk", fail)
        prompt = engine.render_chat([ChatMessage(role="user", text="Hi.")])

        async def run(params):
            return [d async for d in engine.stream(prompt, params, "r")]

        async def both():
            return await asyncio.gather(
                run(SamplingParams(max_tokens=3, ignore_eos=True, prompt_logprobs=0)),
                run(SamplingParams(max_tokens=3, ignore_eos=True)),
                return_exceptions=True,
            )

        failed, served = asyncio.run(both())
        assert isinstance(failed, RuntimeError) and "out of memory" in str(failed)
        assert len([t for d in served for t in d.token_ids]) == 3
        assert not runner._scores and not runner._score_tails
    finally:
        engine.close()
