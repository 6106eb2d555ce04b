"""LoRA adapters on the transformers engine's scheduler and runner (in process, tiny-llama-lora): each
row's tokens get their own adapter's delta in packed prefills, mixed steps and decode, as PEFT's merged
model answers; prefixes cached under one adapter are never reused under another."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from lora_reference import ADAPTER_RECIPES, peft_greedy

from shardbento.catalog import load_spec
from shardbento.engine.base import ChatMessage, SamplingParams
from shardbento.lora import AdapterError

pytest.importorskip("peft")

QUESTIONS = ["Tell me a story.", "What is two plus two?", "Name a color.", "Why is the sky blue?", "Hi!"]


@pytest.fixture(scope="module")
def lora_engine():
    from inprocess import InProcessEngine

    from shardbento.engine.hf.loading import load_model
    from shardbento.plan.preflight import run_preflight

    spec = load_spec("tiny-llama-lora")
    engine = InProcessEngine(load_model(spec, run_preflight(spec)))
    yield engine
    engine.close()


def params(adapter: str | None, max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, adapter=adapter)


async def tokens_of(engine, prompt, sampling) -> list[int]:
    return [t async for d in engine.stream(prompt, sampling) for t in d.token_ids]


def test_lora_mixed_batches_equal_each_adapters_peft_answer(lora_engine) -> None:
    """Base and four adapters at once, then more arriving mid-decode: every answer equals PEFT's merged
    model's; prompts of different adapters were prefilled packed together and joined in mixed steps,
    and their decode steps ran the lean forward (lean.py) through the adapters' wrapped projections."""
    runner = lora_engine.runner
    assert runner.lean is not None
    prompts = [lora_engine.render_chat([ChatMessage(role="user", text=q)]) for q in QUESTIONS]
    adapters = [None, *ADAPTER_RECIPES]
    packed, mixed_slots = [], []
    prefill, mixed = runner.prefill, runner.mixed

    def counting_prefill(chunks):
        packed.append({c.lora_slot for c in chunks})
        return prefill(chunks)

    def counting_mixed(chunks, token_ids, *slots):
        mixed_slots.append({c.lora_slot for c in chunks} | set(*slots))
        return mixed(chunks, token_ids, *slots)

    runner.prefill, runner.mixed = counting_prefill, counting_mixed

    async def run() -> list[list[int]]:
        first = [tokens_of(lora_engine, p, params(a, 48)) for p, a in zip(prompts, adapters, strict=True)]
        started = [asyncio.ensure_future(c) for c in first]
        for _ in range(500):  # the first five decode (bounded wait); the next five join them
            if len(lora_engine.scheduler._running) == len(first):
                break
            await asyncio.sleep(0.002)
        later = [
            tokens_of(lora_engine, p, params(a)) for p, a in zip(prompts, reversed(adapters), strict=True)
        ]
        return await asyncio.gather(*started, *later)

    try:
        got = asyncio.run(run())
    finally:
        del runner.prefill, runner.mixed
    wanted = [(p, a, 48) for p, a in zip(prompts, adapters, strict=True)]
    wanted += [(p, a, 8) for p, a in zip(prompts, reversed(adapters), strict=True)]
    for answer, (prompt, adapter, n) in zip(got, wanted, strict=True):
        assert answer == peft_greedy(ADAPTER_RECIPES.get(adapter), prompt.token_ids, n), adapter
    assert any(len(slots) > 1 for slots in packed), "no prefill packed prompts of different adapters"
    assert any(len(slots) > 1 for slots in mixed_slots), "no mixed step held rows of different adapters"
    base = peft_greedy(None, prompts[0].token_ids, 12)
    assert all(peft_greedy(r, prompts[0].token_ids, 12) != base for r in ADAPTER_RECIPES.values())


def test_lora_prefix_cache_is_never_shared_across_adapters(lora_engine) -> None:
    """A long prompt cached under the base model is computed afresh under an adapter (its answer is the
    adapter's), and hits the cache the second time under that same adapter."""
    prompt = lora_engine.encode(" ".join(["a long shared system prompt"] * 12))
    hits = lora_engine.metrics.prefix_hits

    def run(adapter: str | None) -> tuple[list[int], float]:
        before = hits._value.get()
        answer = asyncio.run(tokens_of(lora_engine, prompt, params(adapter)))
        return answer, hits._value.get() - before

    run(None)
    answer, hit = run("tiny-b")
    assert hit == 0
    assert answer == peft_greedy(ADAPTER_RECIPES["tiny-b"], prompt.token_ids, 8)
    again, hit = run("tiny-b")
    assert hit > 0 and again == answer
    answer, hit = run("tiny-c")
    assert hit == 0 and answer == peft_greedy(ADAPTER_RECIPES["tiny-c"], prompt.token_ids, 8)


def test_lora_adapter_over_the_rank_bound_is_refused_by_name(lora_engine) -> None:
    from shardbento.tiny.lora import ensure_adapter

    with pytest.raises(AdapterError, match="'big'.*rank 64 is over max_lora_rank 16"):
        lora_engine.runner.lora.read("big", str(ensure_adapter("tiny-llama-lora-r64")))


def test_lora_adapter_of_another_shape_is_refused_by_name(lora_engine, tmp_path: Path) -> None:
    """An adapter whose target module is missing from the base model names the module."""
    import json
    import shutil

    from shardbento.tiny.lora import ensure_adapter

    source = ensure_adapter("tiny-llama-lora-b")
    shutil.copytree(source, tmp_path / "other")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(source / "adapter_model.safetensors"))
    renamed = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    save_file(renamed, str(tmp_path / "other" / "adapter_model.safetensors"))
    config = json.loads((source / "adapter_config.json").read_text())
    (tmp_path / "other" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="'other'.*model.layers.7.self_attn.q_proj, which is not a linear"):
        lora_engine.runner.lora.read("other", str(tmp_path / "other"))
