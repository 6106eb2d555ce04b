"""Mllama (cross-attention) and Qwen2.5-VL (multimodal rotary positions) in the continuous batch: image
and text requests together give generate()'s tokens, a text row is untouched by image rows beside it
or by the image that held its slot before, a preempted image request is recomputed to the same tokens,
and Mllama never runs more image rows than its cross-attention state holds."""

from __future__ import annotations

import asyncio

import pytest
import torch
from inprocess import InProcessEngine
from prometheus_client import REGISTRY
from vision_cases import generate_tokens, image_chat, mixed_chats, text_chat

from shardbento.catalog import ServingLimits
from shardbento.engine.base import SamplingParams
from shardbento.engine.batch.crossattn import CrossAttentionSlots
from shardbento.engine.batch.kvslots import BLOCK, SlotKVCache

FAMILIES = ["tiny-mllama", "tiny-qwen2.5-vl"]
FIXTURES = {"tiny-mllama": "mllama_model", "tiny-qwen2.5-vl": "qwen_vl_model"}


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest):
    return request.getfixturevalue(FIXTURES[request.param])


def exactly(count: int, **sampling) -> SamplingParams:
    """Greedy, EOS blocked until `count` tokens (generate()'s min_new_tokens): every run is as long."""
    return SamplingParams(max_tokens=count, min_tokens=count, **sampling)


def stream_all(engine: InProcessEngine, prompts: list, params: SamplingParams) -> list[list[int]]:
    async def one(index: int, prompt) -> list[int]:
        return [t async for d in engine.stream(prompt, params, f"r{index}") for t in d.token_ids]

    async def run() -> list[list[int]]:
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    return asyncio.run(run())


def metric(name: str, model: str) -> float:
    return REGISTRY.get_sample_value(f"shardbento:{name}", {"model_name": model}) or 0.0


def test_vision_batch_images_and_text_together_equal_generate(family) -> None:
    """Six chats at once, images of several shapes between text ones: each gets its generate() tokens
    (image prompts prefill alone, then every row decodes in one batch; text prompts pack and mix)."""
    prompts = [family.prompts.render_chat(chat) for chat in mixed_chats(6)]
    engine = InProcessEngine(family)
    try:
        together = stream_all(engine, prompts, exactly(10))
    finally:
        engine.close()
    assert together == [generate_tokens(family, p, 10) for p in prompts]
    assert len({tuple(t) for t in together}) > 2  # the images and texts lead to different answers


def images_then_text(loaded) -> tuple[list[list[int]], list]:
    """Two image requests together (rows 0 and 1), then a text request with an image one: the text
    joins first, in row 0, whose slot held an image, and decodes beside an image row."""
    render = loaded.prompts.render_chat
    images = [render(image_chat(s, "What is in the picture?", width=64, height=40)) for s in (7, 8)]
    text = render(text_chat("Tell me a story about cats and trains."))
    engine = InProcessEngine(loaded)
    try:
        first = stream_all(engine, images, exactly(6))
        then = stream_all(engine, [text, images[1]], exactly(6))
    finally:
        engine.close()
    return first + then, [*images, text, images[1]]


def test_vision_batch_text_in_a_slot_that_held_an_image(family) -> None:
    """A text row in a slot an image left, beside an image row: its tokens are generate()'s (the image's
    state left the slot with it, and the image row beside it leaves it untouched)."""
    tokens, prompts = images_then_text(family)
    assert tokens == [generate_tokens(family, p, 6) for p in prompts]


def test_vision_batch_reused_mllama_slot_must_be_zeroed(mllama_model, monkeypatch) -> None:
    """The check above can fail: a slot whose image keys are not zeroed when the image leaves makes the
    next text row there attend to them beside an image row (its cross-attention is no longer a no-op)."""

    def forget(self, row: int) -> None:  # frees the slot without zeroing it
        slot = self.slot_of_row[row]
        if slot is not None:
            self._free.add(slot)
            self.slot_of_row[row] = None
        self._masks[row].zero_()

    monkeypatch.setattr(CrossAttentionSlots, "clear", forget)
    tokens, prompts = images_then_text(mllama_model)
    assert tokens[2] != generate_tokens(mllama_model, prompts[2], 6)


def test_vision_batch_preempted_image_requests_recompute_the_same_tokens(family) -> None:
    """A pool too small for every request at once: image requests are preempted and prefilled again
    with what they generated (their pixels, and the per-token inputs grown as generate() grows them:
    Qwen2-VL's token types, Mllama's cross-attention mask), and each still gets generate()'s tokens."""
    prompts = [family.prompts.render_chat(chat) for chat in mixed_chats(5)]
    blocks = -(-max(p.num_tokens for p in prompts) // BLOCK)
    # three rows as wide as the longest prompt; fewer once the sequences grow a block past it
    engine = InProcessEngine(family, ServingLimits(kv_cache_tokens=3 * blocks * BLOCK))
    name = family.prompts.spec.name
    before = metric("num_preemptions_total", name)
    try:
        squeezed = stream_all(engine, prompts, exactly(BLOCK))
    finally:
        engine.close()
    assert metric("num_preemptions_total", name) > before
    assert squeezed == [generate_tokens(family, p, BLOCK) for p in prompts]


def test_vision_batch_repetition_penalty_on_an_image_prompt(family) -> None:
    """A repetition penalty over an image prompt (Mllama's image id is past the logits: never indexed)
    changes the answer and gives the same tokens alone and inside a batch with other image rows."""
    prompts = [family.prompts.render_chat(image_chat(s, "Describe the colours you see.")) for s in (3, 4)]
    engine = InProcessEngine(family)
    try:
        penalised = exactly(16, repetition_penalty=3.0)
        alone = stream_all(engine, prompts[:1], penalised)
        together = stream_all(engine, prompts, penalised)
        plain = stream_all(engine, prompts[:1], exactly(16))
    finally:
        engine.close()
    assert together[0] == alone[0] != plain[0]
    if family.model.config.model_type == "mllama":
        assert family.model.config.image_token_index == family.model.lm_head.out_features


def test_vision_batch_mllama_runs_no_more_image_rows_than_its_cross_attention_state(mllama_model) -> None:
    """A cross-attention state for two image sequences: five image requests (and a text one) all get
    generate()'s tokens, never more than two image rows run at once, and rows whose images are not in
    their own slots read them gathered."""
    prompts = [mllama_model.prompts.render_chat(chat) for chat in mixed_chats(9) if chat[0].images]
    prompts.insert(1, mllama_model.prompts.render_chat(text_chat("Why do rivers bend, Alice?")))
    engine = InProcessEngine(mllama_model)
    runner = engine.runner
    kv = runner.kv
    runner.kv = SlotKVCache(kv.num_slots, kv.max_len, kv.pool_tokens, runner._cross(kv.num_slots, 2))
    runner.kv.cross.allocate()
    most, gathered = [0], [0]
    load, begin = CrossAttentionSlots.load, CrossAttentionSlots.begin_step

    def counting_load(self, row, cache, mask_row):
        load(self, row, cache, mask_row)
        most[0] = max(most[0], sum(slot is not None for slot in self.slot_of_row))

    def counting_step(self, num_rows, device):
        mask = begin(self, num_rows, device)
        slots = self.slot_of_row[:num_rows]
        gathered[0] += any(s is not None and s != r for r, s in enumerate(slots))
        return mask

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CrossAttentionSlots, "load", counting_load)
        patch.setattr(CrossAttentionSlots, "begin_step", counting_step)
        try:
            tokens = stream_all(engine, prompts, exactly(8))
        finally:
            engine.close()
    assert most[0] == 2
    assert gathered[0] > 0
    assert tokens == [generate_tokens(mllama_model, p, 8) for p in prompts]


def test_vision_batch_text_rows_skip_cross_attention_when_no_image_runs(mllama_model) -> None:
    """With only text rows, no cross-attention layer runs (the decode passes no image mask), as a text
    prompt's generate() skips them."""
    engine = InProcessEngine(mllama_model)
    seen = []
    decode = engine.runner._cross_inputs

    def spy(num_rows: int) -> dict[str, torch.Tensor]:
        extra = decode(num_rows)
        seen.append(bool(extra))
        return extra

    engine.runner._cross_inputs = spy
    prompts = [mllama_model.prompts.render_chat(text_chat(t)) for t in ("Why do rivers bend?", "Hi Bob.")]
    try:
        tokens = stream_all(engine, prompts, exactly(5))
    finally:
        engine.close()
    assert seen and not any(seen)
    assert tokens == [generate_tokens(mllama_model, p, 5) for p in prompts]


def test_vision_batch_load_check_passes_here_and_catches_a_wrong_path(family, monkeypatch) -> None:
    """The load-time check (an image row beside a text row against each alone through the model's own
    cache) passes on these models, and fails when the path is wrong: Mllama's rows without their image
    mask rows (every row then attends to nothing), Qwen2-VL's slot without its rope delta."""
    from shardbento.engine.batch import prefill
    from shardbento.engine.batch.runner import ModelRunner

    def check() -> bool:
        runner = ModelRunner(family.model, 4, 256, max_images=family.prompts.spec.max_images)
        with torch.inference_mode():
            runner.allocate_pool(ServingLimits(kv_cache_tokens=1024))
            return runner.batches_images()

    assert check()
    if family.model.config.model_type == "mllama":
        step = CrossAttentionSlots.begin_step
        monkeypatch.setattr(
            CrossAttentionSlots,
            "begin_step",
            lambda self, n, device: (
                None
                if step(self, n, device) is None
                else torch.zeros((n, 1, *self.shape.mask_shape), dtype=torch.long, device=device)
            ),
        )
    else:
        monkeypatch.setattr(prefill, "rope_positions", lambda model, inputs: ({}, 0))
    assert not check()
