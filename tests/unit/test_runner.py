"""The model runner: batched and chunked prefill and slot release each equal their one-at-a-time form."""

from __future__ import annotations

import pytest
import torch

from shardbento.engine.batch import packed
from shardbento.engine.batch.kvslots import PREFIX_BLOCK as B
from shardbento.engine.batch.runner import ModelRunner, PrefillChunk
from shardbento.engine.batch.selfcheck import enable_packing

PROMPTS = ((5, 9, 14), tuple(range(20, 61)), (7, 8, 9, 10, 11, 12, 13))


def runner(engine) -> ModelRunner:
    return ModelRunner(engine.model, num_slots=4, max_model_len=256)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-4) and torch.equal(a.argmax(-1), b.argmax(-1))


@torch.inference_mode()
def test_runner_batched_prefill_equals_one_at_a_time(text_model) -> None:
    together, alone = runner(text_model), runner(text_model)
    batched = together.prefill([PrefillChunk(i, p, 0, i) for i, p in enumerate(PROMPTS)])
    single = torch.stack([alone.prefill([PrefillChunk(i, p, 0, i)])[0] for i, p in enumerate(PROMPTS)])
    assert close(batched, single)
    step = [int(t) for t in single.argmax(-1)]
    assert close(together.decode(step), alone.decode(step))


@torch.inference_mode()
def test_runner_chunked_prefill_equals_whole_prompt(text_model) -> None:
    chunked, whole = runner(text_model), runner(text_model)
    prompt = PROMPTS[1]
    length = len(prompt)
    chunked.prefill([PrefillChunk(0, prompt[:16], 0, None, length=length)])
    chunked.prefill([PrefillChunk(0, prompt[16:32], 16, None, length=length)])
    last = chunked.prefill([PrefillChunk(0, prompt[32:], 32, 0, length=length)])
    assert close(last, whole.prefill([PrefillChunk(0, prompt, 0, 0)]))
    assert chunked.kv.lengths[0] == len(prompt)
    assert close(chunked.decode([3]), whole.decode([3]))


@torch.inference_mode()
def test_runner_chunks_grow_in_their_pool_row_past_running_rows_that_leave(text_model, monkeypatch) -> None:
    """A long prompt prefilled in chunks keeps its KV in the pool row after the running ones (no cache of
    its own: DynamicCache is never made for it), follows that row when a running sequence leaves, and
    joins the batch in place: its logits and the next decode equal a whole-prompt prefill's."""
    import transformers

    chunked, whole = runner(text_model), runner(text_model)
    running = [PROMPTS[0], PROMPTS[2]]
    chunked.prefill([PrefillChunk(10 + i, p, 0, i) for i, p in enumerate(running)])
    whole.prefill([PrefillChunk(11, running[1], 0, 0)])
    prompt = tuple(range(100, 180))

    def no_cache(*args, **kwargs):
        raise AssertionError("a chunk made a cache of its own")

    monkeypatch.setattr(transformers, "DynamicCache", no_cache)
    chunked.prefill([PrefillChunk(0, prompt[:32], 0, None, length=len(prompt))])
    assert (chunked.kv.partial_row, chunked.kv.lengths[2]) == (2, 32)
    chunked.decode([4, 4])  # the running rows step on beside it
    chunked.release([0])  # the first running sequence leaves: the chunked row follows the batch's end
    assert (chunked.kv.partial_row, chunked.kv.lengths[1:3]) == (1, [32, 0])
    chunked.prefill([PrefillChunk(0, prompt[32:64], 32, None, length=len(prompt))])
    last = chunked.prefill([PrefillChunk(0, prompt[64:], 64, 1, length=len(prompt))])
    monkeypatch.undo()
    whole.decode([4])
    expected = whole.prefill([PrefillChunk(0, prompt, 0, 1)])
    assert chunked.kv.partial_row is None and chunked.num_rows == 2
    assert chunked.kv.lengths[:2] == whole.kv.lengths[:2] == [len(running[1]) + 1, len(prompt)]
    assert close(last, expected)
    assert close(chunked.decode([5, 6]), whole.decode([5, 6]))


@torch.inference_mode()
def test_runner_chunked_prompt_from_a_cached_prefix_and_dropped(text_model) -> None:
    chunked, whole = runner(text_model), runner(text_model)
    prompt = tuple(range(200, 260))
    blocks = with_prefixes(chunked, [prompt], [2 * B])[0]
    chunked.prefill([PrefillChunk(7, (1, 2, 3), 0, None, length=40)])  # abandoned: dropped below
    chunked.drop(7)
    assert chunked.kv.partial_row is None and chunked.kv.lengths[0] == 0
    chunked.prefill([PrefillChunk(0, prompt[2 * B : 48], 2 * B, None, prefix=blocks, length=len(prompt))])
    last = chunked.prefill([PrefillChunk(0, prompt[48:], 48, 0, length=len(prompt))])
    assert close(last, whole.prefill([PrefillChunk(0, prompt, 0, 0)]))
    assert close(chunked.decode([9]), whole.decode([9]))


@torch.inference_mode()
def test_runner_release_moves_last_row_into_gap(text_model) -> None:
    three, two = runner(text_model), runner(text_model)
    three.prefill([PrefillChunk(i, p, 0, i) for i, p in enumerate(PROMPTS)])
    two.prefill([PrefillChunk(0, PROMPTS[2], 0, 0), PrefillChunk(1, PROMPTS[1], 0, 1)])
    three.release([0])
    assert (three.num_rows, three.kv.lengths[:3]) == (2, [len(PROMPTS[2]), len(PROMPTS[1]), 0])
    assert close(three.decode([4, 4]), two.decode([4, 4]))


def with_prefixes(
    runner: ModelRunner, prompts: list[tuple[int, ...]], cached: list[int]
) -> list[tuple[int, ...]]:
    """Cache the first `cached[i]` tokens (whole blocks) of each prompt; the blocks that hold each."""
    blocks, base = [], 0
    for slot, (prompt, n) in enumerate(zip(prompts, cached, strict=True)):
        count = n // B
        if count:
            runner.prefill([PrefillChunk(slot, prompt[:n], 0, 0)])
            runner.store_prefix([(0, j, base + j) for j in range(count)])
            runner.release([0])
        blocks.append(tuple(range(base, base + count)))
        base += count
    return blocks


@pytest.mark.parametrize("repeat_kv", [False, True], ids=["gqa", "kv-repeated"])
@torch.inference_mode()
def test_runner_packed_prefill_equals_each_prompt_alone(text_model, monkeypatch, repeat_kv: bool) -> None:
    """Prompts of different lengths, two of them continuing from cached prefixes of different lengths and
    one with a twin, packed in one row: each row's logits, its KV and the decode after them equal each
    prompt prefilled alone (no row pads or recomputes: each computes exactly its tokens past its prefix).
    Also with the KV heads repeated once per layer, as on CUDA (fused kernels take a mask or GQA)."""
    assert text_model.model.config.num_key_value_heads < text_model.model.config.num_attention_heads
    devices = frozenset({"cpu"} if repeat_kv else ())
    monkeypatch.setattr("shardbento.engine.batch.packed.REPEAT_KV_DEVICES", devices)
    assert enable_packing(text_model.model)
    prompts = [tuple(range(20, 61)), tuple(range(5, 40)), (7, 8, 9, 10, 11, 12, 13), tuple(range(30, 100))]
    cached = [2 * B, 0, 0, B]
    results = []
    for mode in ("packed", "alone"):
        run = ModelRunner(text_model.model, num_slots=6, max_model_len=256)
        run.packs = mode == "packed"
        blocks = with_prefixes(run, prompts, cached)
        chunks = [
            PrefillChunk(i, p[n:], n, slot, prefix=blocks[i], copies=(2,) if i == 1 else ())
            for i, (p, n, slot) in enumerate(zip(prompts, cached, (0, 1, 3, 4), strict=True))
        ]  # the twin's slot follows its prompt's, as the scheduler places them
        if mode == "alone":
            logits = torch.cat([run.prefill([chunk]) for chunk in chunks])
        else:
            logits = run.prefill(chunks)
        step = [int(t) for t in logits.argmax(-1)]
        results.append((logits, run.kv.lengths[:5], run.decode([step[0], step[1], step[1], *step[2:]])))
    (packed, lengths, decoded), (alone, alone_lengths, alone_decoded) = results
    assert lengths == alone_lengths == [len(prompts[i]) for i in (0, 1, 1, 2, 3)]
    assert close(packed, alone) and close(decoded, alone_decoded)


def test_runner_packs_only_models_whose_attention_it_checked(text_inprocess, vision_model) -> None:
    """The packed attention is switched on only after it reproduced the model's own logits; a vision model
    (its images prefill alone) keeps its attention."""
    assert text_inprocess.model.config._attn_implementation == packed.ATTENTION
    assert text_inprocess.runner.packs
    assert not enable_packing(vision_model.model)


@torch.inference_mode()
def test_runner_mixed_step_equals_decode_and_prefill_apart(text_model) -> None:
    """Running rows' decode tokens and fresh prompts (one from a cached prefix, one with a twin) in one
    forward: the same logits as a decode step and a prefill apart, and the next decode step too."""
    running, prompts = [PROMPTS[1], PROMPTS[2]], [tuple(range(30, 100)), tuple(range(5, 40))]
    results = []
    for mode in ("mixed", "apart"):
        run = ModelRunner(text_model.model, num_slots=6, max_model_len=256)
        run.packs = run.mixes = True
        blocks = with_prefixes(run, prompts, [2 * B, 0])
        run.prefill([PrefillChunk(10 + i, p, 0, i) for i, p in enumerate(running)])
        chunks = [
            PrefillChunk(0, prompts[0][2 * B :], 2 * B, 2, prefix=blocks[0]),
            PrefillChunk(1, prompts[1], 0, 3, copies=(4,)),
        ]
        if mode == "mixed":
            prompt_logits, decoded = run.mixed(chunks, [4, 9])
        else:
            decoded = run.decode([4, 9])
            prompt_logits = run.prefill(chunks)
        lengths = run.kv.lengths[:5]
        step = [int(t) for t in prompt_logits.argmax(-1)]
        results.append((decoded, prompt_logits, lengths, run.decode([6, 6, step[0], step[1], step[1]])))
    (decoded, prompt_logits, lengths, after), (decoded_apart, prompt_apart, lengths_apart, after_apart) = (
        results
    )
    assert lengths == lengths_apart == [len(running[0]) + 1, len(running[1]) + 1, 70, 35, 35]
    assert close(decoded, decoded_apart) and close(prompt_logits, prompt_apart) and close(after, after_apart)


def test_runner_mixes_once_checked_at_load(text_inprocess) -> None:
    assert text_inprocess.runner.mixes
