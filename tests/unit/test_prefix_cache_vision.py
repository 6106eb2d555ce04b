"""Prefix caching of vision prompts: a later turn with the same image reuses the image's KV (the match
includes the images), another image never does, and greedy text equals an engine without the cache."""

from __future__ import annotations

import asyncio

import torch
from inprocess import InProcessEngine
from PIL import Image
from prometheus_client import REGISTRY

from shardbento.catalog import ServingLimits
from shardbento.engine.base import ChatMessage, SamplingParams


def hits() -> float:
    return (
        REGISTRY.get_sample_value("shardbento:prefix_cache_hits_total", {"model_name": "tiny-llava"}) or 0.0
    )


def engine_with(loaded, **limits) -> InProcessEngine:
    return InProcessEngine(loaded, ServingLimits(**limits))


def picture(seed: int) -> Image.Image:
    pixels = torch.randint(
        0, 256, (40, 48, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )
    return Image.fromarray(pixels.numpy())


def two_turns(
    engine: InProcessEngine, image: Image.Image, second_image: Image.Image
) -> tuple[list[str], float]:
    """Turn 1 asks about `image`; turn 2 repeats the conversation with `second_image` in its place."""

    async def ask(messages: list[ChatMessage]) -> str:
        prompt = engine.render_chat(messages)
        return "".join([d.text async for d in engine.stream(prompt, SamplingParams(max_tokens=8), "v")])

    async def run() -> tuple[list[str], float]:
        question = "Describe the picture in detail, please, with every colour you can see in it."
        first = [ChatMessage(role="user", text=question, images=(image,))]
        answer = await ask(first)
        before = hits()
        second = [
            ChatMessage(role="user", text=question, images=(second_image,)),
            ChatMessage(role="assistant", text=answer),
            ChatMessage(role="user", text="And what is in the corners?"),
        ]
        return [answer, await ask(second)], hits() - before

    return asyncio.run(run())


def test_prefix_cache_vision_same_image_reuses_its_kv_other_image_does_not(vision_model) -> None:
    cached = engine_with(vision_model, prefix_caching=True)
    plain = engine_with(vision_model, prefix_caching=False)
    try:
        same, reused = two_turns(cached, picture(1), picture(1))
        other, reused_other = two_turns(cached, picture(2), picture(3))
        assert same == two_turns(plain, picture(1), picture(1))[0]
        assert other == two_turns(plain, picture(2), picture(3))[0]
    finally:
        cached.close()
        plain.close()
    image_tokens = vision_model.prompts.render_chat(
        [ChatMessage(role="user", text="x", images=(picture(1),))]
    ).token_ids.count(vision_model.model.config.image_token_id)
    assert reused >= image_tokens  # the second turn started past the image
    assert reused_other == 0  # the same text with another image: nothing to reuse
