"""The model runner: batched and chunked prefill and slot release each equal their one-at-a-time form."""

from __future__ import annotations

import torch

from shardbento.engine.batch.runner import ModelRunner, PrefillChunk

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
