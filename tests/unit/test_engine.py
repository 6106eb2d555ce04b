"""The transformers engine against model.generate: parity, stops, EOS ids, seeds, placement."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch

from shardbento.catalog import load_spec
from shardbento.engine import create_engine
from shardbento.engine.base import ChatMessage, SamplingParams


def run(engine, prompt, params: SamplingParams):
    async def collect():
        return [d async for d in engine.stream(prompt, params, "test")]

    deltas = asyncio.run(collect())
    tokens = [t for d in deltas for t in d.token_ids]
    return "".join(d.text for d in deltas), tokens, deltas[-1].finish_reason, deltas


def reference_tokens(loaded, prompt, max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate() on the model loaded in this process."""
    with torch.inference_mode():
        out = loaded.model.generate(**prompt.inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, prompt.num_tokens :].tolist()


def chat(engine, text: str = "Tell me about the sharded bento."):
    return engine.render_chat([ChatMessage(role="user", text=text)])


def test_engine_greedy_matches_generate_text(text_engine, text_model) -> None:
    prompt = chat(text_engine)
    _, tokens, _, _ = run(text_engine, prompt, SamplingParams(max_tokens=24))
    assert tokens == reference_tokens(text_model, prompt, 24)[: len(tokens)]
    assert len(tokens) == 24 or tokens[-1] in text_model.prompts.eos_token_ids


def test_engine_greedy_matches_generate_vision(vision_engine, vision_model) -> None:
    from PIL import Image

    pixels = torch.randint(0, 256, (48, 40, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    prompt = vision_engine.render_chat([ChatMessage(role="user", text="What is this?", images=(image,))])
    assert prompt.num_images == 1
    assert "pixel_values" in prompt.inputs
    _, tokens, _, _ = run(vision_engine, prompt, SamplingParams(max_tokens=16))
    assert tokens == reference_tokens(vision_model, prompt, 16)[: len(tokens)]


def test_engine_stop_string_trims_and_stops(text_engine) -> None:
    prompt = chat(text_engine)
    full_text, full_tokens, _, _ = run(text_engine, prompt, SamplingParams(max_tokens=32))
    stop = full_text.strip()[len(full_text.strip()) // 2 :][:4]
    assert stop, full_text
    text, tokens, finish, _ = run(text_engine, prompt, SamplingParams(max_tokens=32, stop=(stop,)))
    assert finish == "stop"
    assert text == full_text[: full_text.index(stop)]
    assert stop not in text
    assert len(tokens) < len(full_tokens)


def test_engine_every_eos_id_ends_generation(text_engine, text_model) -> None:
    config_eos = text_model.model.generation_config.eos_token_id
    assert isinstance(config_eos, list) and len(config_eos) >= 2
    assert set(config_eos) <= text_model.prompts.eos_token_ids
    prompt = chat(text_engine)
    _, tokens, _, _ = run(text_engine, prompt, SamplingParams(max_tokens=24, ignore_eos=True))
    # Declare a token the model emits mid-answer as an extra EOS id: generation must end right there.
    marker = tokens[len(tokens) // 2]
    engine = create_engine(replace_spec(text_engine.spec, eos_token_ids=[marker]))
    try:
        _, stopped_tokens, finish, _ = run(engine, prompt, SamplingParams(max_tokens=24))
    finally:
        engine.close()
    assert finish == "stop"
    assert stopped_tokens == tokens[: tokens.index(marker) + 1]


def replace_spec(spec, **changes):
    return spec.model_copy(update=changes)


def test_engine_seeded_sampling_reproducible(text_engine) -> None:
    prompt = chat(text_engine)
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    _, first, _, _ = run(text_engine, prompt, params)
    _, again, _, _ = run(text_engine, prompt, params)
    _, other, _, _ = run(text_engine, prompt, replace(params, seed=4321))
    assert first == again
    assert first != other


def test_engine_sampling_leaves_global_rng_alone(text_inprocess) -> None:
    """Sampling draws from each request's own generator: the process's global RNG is untouched (the
    scheduler's loop here, in this process, where the RNG can be watched)."""
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    run(text_inprocess, chat(text_inprocess), SamplingParams(max_tokens=4, temperature=1.0, seed=5))
    run(text_inprocess, chat(text_inprocess), SamplingParams(max_tokens=4, temperature=1.0))
    assert torch.equal(torch.rand(3), expected)


def test_engine_logprobs_match_model_scores(text_engine, text_model) -> None:
    prompt = chat(text_engine)
    _, tokens, _, deltas = run(text_engine, prompt, SamplingParams(max_tokens=3, logprobs=2, ignore_eos=True))
    logprobs = [lp for d in deltas for lp in d.logprobs]
    assert len(logprobs) == len(tokens) == 3
    with torch.inference_mode():
        logits = text_model.model(**prompt.inputs).logits[0, -1].float()
    expected = logits.log_softmax(-1)[tokens[0]].item()
    assert logprobs[0].logprob == pytest.approx(expected, abs=1e-4)
    assert len(logprobs[0].top) == 2
    assert logprobs[0].top[0][1] >= logprobs[0].top[1][1]


def test_engine_min_tokens_suppresses_eos(text_engine, text_model) -> None:
    prompt = chat(text_engine)
    _, tokens, _, _ = run(text_engine, prompt, SamplingParams(max_tokens=12, min_tokens=12))
    assert len(tokens) == 12
    assert not set(tokens[:-1]) & text_model.prompts.eos_token_ids


def test_engine_offloaded_layer_split_uses_embedding_device(tmp_path) -> None:
    """A multi-device map (one layer offloaded to disk): inputs follow the embeddings, output unchanged."""
    base = load_spec("tiny-llama")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    split = create_engine(base.model_copy(update={"device_map": device_map}))
    plain = create_engine(base)
    try:
        assert split.info.parallel == "layers"
        prompt = chat(plain)
        params = SamplingParams(max_tokens=12)
        assert run(split, prompt, params)[1] == run(plain, prompt, params)[1]
    finally:
        split.close()
        plain.close()


def test_engine_serves_next_request_after_client_leaves(text_engine) -> None:
    prompt = chat(text_engine)

    async def first_then_leave():
        stream = text_engine.stream(prompt, SamplingParams(max_tokens=200, ignore_eos=True), "cancel")
        first = await stream.__anext__()
        await stream.aclose()
        # the engine thread must be free again: a new request completes
        rest = [d async for d in text_engine.stream(prompt, SamplingParams(max_tokens=2), "next")]
        return first, rest

    # bounded: were the engine still busy with the abandoned request, the next one would wait forever
    first, rest = asyncio.run(asyncio.wait_for(first_then_leave(), timeout=120))
    assert len(first.token_ids) == 1
    assert rest[-1].finish_reason is not None
