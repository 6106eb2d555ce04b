"""The KV pool: allocated once at load, rows re-laid in place, admission and preemption by free tokens."""

from __future__ import annotations

import asyncio

import pytest
import torch
from inprocess import InProcessEngine
from prometheus_client import REGISTRY

from shardbento.api.request import Sampling
from shardbento.api.serving import Serving
from shardbento.catalog import ServingLimits
from shardbento.engine.base import SamplingParams
from shardbento.engine.batch.kvslots import BLOCK, SlotKVCache
from shardbento.errors import InvalidRequest


def filled_cache(lengths: list[int], pool: int) -> SlotKVCache:
    """A pool whose rows hold distinct values: row r, head h, position p = r * 1000 + h * 100 + p."""
    kv = SlotKVCache(num_slots=8, max_len=1024, pool_tokens=pool)
    kv.fit(len(lengths), max(lengths))
    like = torch.zeros(1, 2, 1, 4)
    keys, values = kv._layer(0, like)
    for row, length in enumerate(lengths):
        for head in range(2):
            keys[row, head, :length] = (row * 1000 + head * 100 + torch.arange(length))[:, None].float()
        kv.lengths[row] = length
    values.copy_(-keys)
    return kv


def rows_of(kv: SlotKVCache) -> list[torch.Tensor]:
    return [
        kv._keys[0][row, :, : kv.lengths[row]].clone() for row in range(len(kv.lengths)) if kv.lengths[row]
    ]


@pytest.mark.parametrize("width", [4 * BLOCK, BLOCK], ids=["grow", "shrink"])
def test_kvpool_relayout_keeps_every_row_in_the_same_storage(width: int) -> None:
    kv = filled_cache([BLOCK - 3, 20, BLOCK // 2 - 1], pool=16 * BLOCK)
    kv._relayout(2 * BLOCK, 3)
    before, storage = rows_of(kv), kv._storage[0][0].data_ptr()
    kv._relayout(width, 3)
    assert kv.width == width
    assert all(torch.equal(a, b) for a, b in zip(before, rows_of(kv), strict=True))
    assert torch.equal(kv._values[0][: kv.rows_at(width)], -kv._keys[0][: kv.rows_at(width)])
    assert kv._storage[0][0].data_ptr() == storage  # laid out again, never reallocated


def test_kvpool_width_stays_while_it_serves_and_narrows_when_rows_need_it() -> None:
    roomy = SlotKVCache(num_slots=4, max_len=1024, pool_tokens=4 * 1024)
    assert roomy.width == 1024  # every slot a full-context row: never laid out again
    kv = filled_cache([100, 20], pool=8 * BLOCK)  # 8 slots share 512 tokens
    kv.fit(2, 101)
    assert kv.width == 2 * BLOCK
    kv.lengths[0] = 0
    kv.fit(1, 21)
    assert kv.width == 2 * BLOCK  # still serves: no copy
    kv.fit(5, 21)
    assert kv.width == BLOCK  # five rows fit only narrower
    assert rows_of(kv)[0][0, :20, 0].tolist() == [1000.0 + p for p in range(20)]


def test_kvpool_holds_counts_rows_at_the_width_of_the_longest() -> None:
    kv = SlotKVCache(num_slots=32, max_len=1024, pool_tokens=4096)
    assert kv.holds(6, 640) and not kv.holds(7, 640)  # 4096 // 640 = 6 rows of 10 blocks
    assert kv.holds(32, 100) and not kv.holds(33, 100)  # never more than max_num_seqs
    assert not kv.holds(1, 1025)  # past the context


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(f"shardbento:{name}", {"model_name": "tiny-llama"}) or 0.0


def small_pool_engine(loaded, tokens: int, max_prefill_tokens: int = 512) -> InProcessEngine:
    return InProcessEngine(
        loaded, ServingLimits(kv_cache_tokens=tokens, max_prefill_tokens=max_prefill_tokens)
    )


async def read_all(engine, prompts, params):
    async def one(prompt):
        deltas = [d async for d in engine.stream(prompt, params, "flood")]
        return "".join(d.text for d in deltas), sum(len(d.token_ids) for d in deltas)

    return await asyncio.gather(*(one(p) for p in prompts))


@pytest.mark.parametrize("max_prefill_tokens", [512, 48], ids=["whole-prompts", "chunked-prompts"])
def test_kvpool_flood_completes_with_preemptions_and_the_same_greedy_text(
    text_engine, text_model, max_prefill_tokens: int
) -> None:
    """More requests than the pool holds: all complete, the pool never grows, sequences are preempted
    and recomputed, and every greedy text equals the one a pool big enough for all of them gives. With
    a small prefill budget every prompt is prefilled in chunks, into its row of the pool."""
    words = "the sharded bento serves many GPUs and every token counts " * 12
    prompts = [text_engine.encode(f"{i} {words}") for i in range(12)]
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    longest = max(p.num_tokens for p in prompts) + params.max_tokens
    pool = 3 * longest  # three sequences at full length; twelve want in
    engine = small_pool_engine(text_model, pool, max_prefill_tokens)
    assert max_prefill_tokens > max(p.num_tokens for p in prompts) or max_prefill_tokens < 64
    preempted = metric("num_preemptions_total")
    try:
        assert engine.kv_pool_tokens == pool
        allocated = engine.runner.kv.allocated_bytes()
        squeezed = asyncio.run(read_all(engine, prompts, params))
        assert engine.runner.kv.allocated_bytes() == allocated
    finally:
        engine.close()
    roomy = asyncio.run(read_all(text_engine, prompts, params))
    assert metric("num_preemptions_total") > preempted
    assert [n for _, n in squeezed] == [params.max_tokens] * len(prompts)
    assert squeezed == roomy


def test_kvpool_request_larger_than_the_pool_is_a_400_with_the_numbers(text_engine) -> None:
    serving = Serving(text_engine.spec)
    prompt = text_engine.encode("Hello there")
    with pytest.raises(InvalidRequest) as refused:
        serving.params(prompt, Sampling(max_tokens=300), text_engine.info.vocab_size, kv_pool_tokens=256)
    message = str(refused.value)
    assert f"needs {prompt.num_tokens + 300} tokens" in message and "holds 256 tokens" in message
    assert refused.value.param == "max_tokens"
    unsaid = serving.params(prompt, Sampling(), text_engine.info.vocab_size, kv_pool_tokens=40)
    assert unsaid.max_tokens == 40 - prompt.num_tokens  # the default shrinks to what the pool holds
