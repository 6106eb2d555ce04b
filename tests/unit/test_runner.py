"""The model runner (batched and chunked prefill, slot release), batched token selection, packed CPU
linears, the allocator setting and the batched Delta hand-over: each equals its one-at-a-time counterpart."""

from __future__ import annotations

import asyncio
import functools
import subprocess
import sys

import pytest
import torch

from shardbento.engine.base import Delta, DeltaChannel, SamplingParams
from shardbento.engine.batch.runner import ModelRunner, PrefillChunk
from shardbento.engine.batch.sampler import RequestSampler, select_tokens
from shardbento.engine.hf.cpu_kernels import pack_linear_weights

PROMPTS = ((5, 9, 14), tuple(range(20, 61)), (7, 8, 9, 10, 11, 12, 13))


def runner(engine) -> ModelRunner:
    return ModelRunner(engine.model, num_slots=4, max_model_len=256)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-4) and torch.equal(a.argmax(-1), b.argmax(-1))


@torch.inference_mode()
def test_runner_batched_prefill_equals_one_at_a_time(text_engine) -> None:
    together, alone = runner(text_engine), runner(text_engine)
    batched = together.prefill([PrefillChunk(i, p, 0, i) for i, p in enumerate(PROMPTS)])
    single = torch.stack([alone.prefill([PrefillChunk(i, p, 0, i)])[0] for i, p in enumerate(PROMPTS)])
    assert close(batched, single)
    step = [int(t) for t in single.argmax(-1)]
    assert close(together.decode(step), alone.decode(step))


@torch.inference_mode()
def test_runner_chunked_prefill_equals_whole_prompt(text_engine) -> None:
    chunked, whole = runner(text_engine), runner(text_engine)
    prompt = PROMPTS[1]
    chunked.prefill([PrefillChunk(0, prompt[:16], 0, None)])
    chunked.prefill([PrefillChunk(0, prompt[16:32], 16, None)])
    last = chunked.prefill([PrefillChunk(0, prompt[32:], 32, 0)])
    assert close(last, whole.prefill([PrefillChunk(0, prompt, 0, 0)]))
    assert chunked.kv.lengths[0] == len(prompt)
    assert close(chunked.decode([3]), whole.decode([3]))


@torch.inference_mode()
def test_runner_release_moves_last_row_into_gap(text_engine) -> None:
    three, two = runner(text_engine), runner(text_engine)
    three.prefill([PrefillChunk(i, p, 0, i) for i, p in enumerate(PROMPTS)])
    two.prefill([PrefillChunk(0, PROMPTS[2], 0, 0), PrefillChunk(1, PROMPTS[1], 0, 1)])
    three.release([0])
    assert (three.num_rows, three.kv.lengths[:3]) == (2, [len(PROMPTS[2]), len(PROMPTS[1]), 0])
    assert close(three.decode([4, 4]), two.decode([4, 4]))


def samplers(eos: set[int]) -> list[RequestSampler]:
    params = [
        SamplingParams(max_tokens=4),
        SamplingParams(max_tokens=4, min_tokens=2),
        SamplingParams(max_tokens=4, temperature=0.8, seed=3),
        SamplingParams(max_tokens=4, logprobs=2),
        SamplingParams(max_tokens=4, repetition_penalty=1.3),
    ]
    return [RequestSampler(p, eos_ids=eos, decode=str) for p in params]


def test_select_tokens_equals_selecting_row_by_row() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    favourite = int(logits[1].argmax())
    eos = {favourite, 49}  # row 1's favourite token is an EOS it must not pick yet (min_tokens=2)
    histories = [None, None, None, None, [1, 2, int(logits[4].argmax())]]
    batched = select_tokens(samplers(eos), logits, histories)
    one_by_one = [s.select(logits[i], histories[i]) for i, s in enumerate(samplers(eos))]
    assert batched == one_by_one
    assert batched[1] != favourite and int(logits[1].argmax()) == favourite  # logits left untouched


@torch.inference_mode()
def test_pack_linear_weights_keeps_logits() -> None:
    from shardbento.catalog import load_spec
    from shardbento.engine.hf.loading import load_model
    from shardbento.plan.preflight import run_preflight

    spec = load_spec("tiny-llama").model_copy(update={"cpu_kernels": "default"})
    plain = load_model(spec, run_preflight(spec)).model
    assert not any(isinstance(m.forward, functools.partial) for m in plain.modules())
    ids = torch.tensor([PROMPTS[1]])
    reference = plain(input_ids=ids).logits
    linears = sum(type(m) is torch.nn.Linear for m in plain.modules())
    assert pack_linear_weights(plain, available_bytes=1) == 0  # copies would not fit: left alone
    assert pack_linear_weights(plain) == linears > 0
    assert close(plain(input_ids=ids).logits, reference)


PREFILL_PAGE_FAULTS = """
import resource, sys, torch
import shardbento.engine.hf.loading as loading
from shardbento.catalog import ModelSpec
from shardbento.engine.batch.runner import ModelRunner, PrefillChunk
from shardbento.plan.preflight import run_preflight

if sys.argv[1] == "default":
    loading.keep_freed_memory = lambda: None
spec = ModelSpec.model_validate(
    {"name": "bench-llama", "source": "generated:bench-llama", "kind": "text", "dtype": "float32"}
)
runner = ModelRunner(loading.load_model(spec, run_preflight(spec)).model, 4, 1024)

def prefill(lengths):
    runner.release(list(range(runner.num_rows)))
    runner.prefill([PrefillChunk(i, tuple(range(10, 10 + n)), 0, i) for i, n in enumerate(lengths)])

with torch.inference_mode():
    prefill([132, 120, 128])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(8):
        prefill([120 + 7 * i, 130, 110 + i][: 1 + i % 3])
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_keep_freed_memory_stops_refaulting_prefill_pages() -> None:
    """The benchmark model's batched prefills, in fresh processes: glibc's defaults hand each forward's
    activation memory back and fault it in again; with keep_freed_memory (applied at load) they do not."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc settings apply on Linux only")
    faults = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", PREFILL_PAGE_FAULTS, mode], capture_output=True, text=True, check=True
            ).stdout.split()[-1]
        )
        for mode in ("default", "keep")
    }
    assert faults["keep"] * 3 < faults["default"], faults


def test_emit_all_delivers_and_reports_closed_loops() -> None:
    async def channels() -> tuple[DeltaChannel, DeltaChannel]:
        return DeltaChannel(), DeltaChannel()

    loop = asyncio.new_event_loop()
    first, second = loop.run_until_complete(channels())
    gone_loop = asyncio.new_event_loop()
    orphan = gone_loop.run_until_complete(channels())[0]
    gone_loop.close()
    items = [(first, Delta("a", finish_reason="stop")), (second, Delta("b", finish_reason="stop"))]
    assert DeltaChannel.emit_all([*items, (orphan, Delta("c"))]) == [orphan]

    async def drain() -> list[str]:
        return ["".join([d.text async for d in channel.deltas()]) for channel in (first, second)]

    assert loop.run_until_complete(drain()) == ["a", "b"]
    loop.close()


def test_select_tokens_tiny_temperature_is_greedy_not_overflow() -> None:
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1)) * 30
    tiny = [
        RequestSampler(SamplingParams(max_tokens=2, temperature=t), eos_ids=set(), decode=str)
        for t in (2.2e-308, 1e-6)
    ]
    assert select_tokens(tiny, logits, [None, None]) == logits.argmax(-1).tolist()
