"""GLM-4V natively, on the tiny THUDM-layout checkpoint: a GLM-4V forward written here from the checkpoint's
own tensors on the original prompt (boi, one placeholder, eoi) against the engine, image requests
batching with text requests, and the preprocessing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
import torch
from PIL import Image
from test_thudm_loader import chatglm_logits, thudm_tensors

from shardbento.catalog import load_spec
from shardbento.engine import create_engine
from shardbento.engine.base import ChatMessage, SamplingParams
from shardbento.engine.core.engine import ProcessEngine
from shardbento.engine.hf.glm4v import CLIP_MEAN, CLIP_STD
from shardbento.tiny.models import ensure_generated

F = torch.nn.functional


@pytest.fixture(scope="module")
def engine() -> Iterator[ProcessEngine]:
    engine = create_engine(load_spec("tiny-glm4v"))
    yield engine
    engine.close()


def picture(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (*size, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def reference_features(w: dict[str, torch.Tensor], vision: dict, pixels: torch.Tensor) -> torch.Tensor:
    """GLM-4V's image side from `transformer.vision.*`: patches + cls + positions, EVA2-CLIP blocks
    (each branch LayerNorm'ed after it), the cls dropped, a 2x2 convolution, the GLU projector, boi and
    eoi around it, all divided by scaling_factor."""
    p, heads = "transformer.vision.", vision["num_heads"]
    x = F.conv2d(
        pixels,
        w[p + "patch_embedding.proj.weight"],
        w[p + "patch_embedding.proj.bias"],
        stride=vision["patch_size"],
    )
    x = torch.cat([w[p + "patch_embedding.cls_embedding"][None], x.flatten(2).transpose(1, 2)], dim=1)
    x = x + w[p + "patch_embedding.position_embedding.weight"][None]
    width = x.shape[-1]
    for layer in range(vision["num_hidden_layers"]):
        b = f"{p}transformer.layers.{layer}."
        qkv = F.linear(x, w[b + "attention.query_key_value.weight"], w[b + "attention.query_key_value.bias"])
        q, k, v = qkv.view(1, -1, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, -1, width)
        attended = F.linear(attended, w[b + "attention.dense.weight"], w[b + "attention.dense.bias"])
        x = x + F.layer_norm(
            attended, (width,), w[b + "input_layernorm.weight"], w[b + "input_layernorm.bias"], 1e-6
        )
        hidden = F.gelu(F.linear(x, w[b + "mlp.fc1.weight"], w[b + "mlp.fc1.bias"]))
        mlp = F.linear(hidden, w[b + "mlp.fc2.weight"], w[b + "mlp.fc2.bias"])
        x = x + F.layer_norm(
            mlp,
            (width,),
            w[b + "post_attention_layernorm.weight"],
            w[b + "post_attention_layernorm.bias"],
            1e-6,
        )
    side = int((x.shape[1] - 1) ** 0.5)
    grid = x[:, 1:].transpose(1, 2).reshape(1, width, side, side)
    x = F.conv2d(grid, w[p + "conv.weight"], w[p + "conv.bias"], stride=2).flatten(2).transpose(1, 2)
    g = p + "linear_proj."
    x = F.linear(x, w[g + "linear_proj.weight"])
    x = F.gelu(F.layer_norm(x, (x.shape[-1],), w[g + "norm1.weight"], w[g + "norm1.bias"]))
    x = F.linear(
        F.silu(F.linear(x, w[g + "gate_proj.weight"])) * F.linear(x, w[g + "dense_h_to_4h.weight"]),
        w[g + "dense_4h_to_h.weight"],
    )
    return torch.cat([w[p + "boi"][0], x[0], w[p + "eoi"][0]]) / vision["scaling_factor"]
    # fmt: skip


def reference_greedy(original_ids: list[int], pixels: torch.Tensor, steps: int) -> list[int]:
    """The original's greedy tokens: its prompt holds boi, one <|endoftext|>, eoi; the image features
    replace those three embeddings, every patch at boi's position + 1, the text keeping its own indices."""
    source = ensure_generated("tiny-glm4v")
    config = json.loads((source / "config.json").read_text())
    w = thudm_tensors(source)
    features = reference_features(w, config["vision_config"], pixels)
    ids, tokens = list(original_ids), []
    for _ in range(steps):
        boi = ids.index(config["boi_token_id"])
        assert ids[boi + 2] == config["eoi_token_id"]
        table = w["transformer.embedding.word_embeddings.weight"]
        embeds = torch.cat([table[ids[:boi]], features, table[ids[boi + 3 :]]])
        n = features.shape[0] - 2
        positions = torch.cat(
            [torch.arange(boi + 1), torch.full((n,), boi + 1), torch.arange(boi + 2, len(ids))]
        )
        logits = chatglm_logits(source, ids, embeds=embeds, positions=positions)
        tokens.append(int(logits[-1].argmax()))
        ids.append(tokens[-1])
    return tokens


def stream(engine: ProcessEngine, prompts: list, params: SamplingParams) -> list[list[int]]:
    async def one(prompt, index: int) -> list[int]:
        return [t async for d in engine.stream(prompt, params, f"v-{index}") for t in d.token_ids]

    async def every() -> list[list[int]]:
        return list(await asyncio.gather(*(one(p, i) for i, p in enumerate(prompts))))

    return asyncio.run(every())


def test_thudm_vision_greedy_tokens_equal_the_original_forward(engine: ProcessEngine) -> None:
    image = picture(3)
    prompt = engine.render_chat([ChatMessage(role="user", text="What is in the picture?", images=(image,))])
    placeholder = engine.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = list(prompt.token_ids)
    first = ids.index(placeholder)
    original = ids[: first + 1] + [t for t in ids[first:] if t != placeholder]  # the three-token form
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    [tokens] = stream(engine, [prompt], params)
    assert tokens == reference_greedy(original, prompt.inputs["pixel_values"], 8)


def test_thudm_vision_image_requests_batch_with_text_requests(engine: ProcessEngine) -> None:
    prompts = [
        engine.render_chat([ChatMessage(role="user", text="Describe it.", images=(picture(1),))]),
        engine.render_chat([ChatMessage(role="user", text="你好, who are you?")]),
        engine.render_chat([ChatMessage(role="user", text="And this one?", images=(picture(2, (20, 64)),))]),
    ]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    assert stream(engine, prompts, params) == [stream(engine, [p], params)[0] for p in prompts]
    assert engine.info.kv_pool_tokens is not None  # GLM-4V's image requests join the batch


def test_thudm_vision_preprocessing_resizes_bicubic_and_normalises_as_clip(engine: ProcessEngine) -> None:
    image = picture(5, (17, 50))
    prompt = engine.render_chat([ChatMessage(role="user", text="hi", images=(image,))])
    size = engine._prompts.processor.image_size
    resized = torch.tensor(
        list(image.resize((size, size), Image.Resampling.BICUBIC).getdata()), dtype=torch.float32
    )
    expected = resized.view(size, size, 3).permute(2, 0, 1) / 255 - torch.tensor(CLIP_MEAN)[:, None, None]
    expected = expected / torch.tensor(CLIP_STD)[:, None, None]
    torch.testing.assert_close(prompt.inputs["pixel_values"][0], expected)
    tokens = engine.tokenizer.convert_ids_to_tokens(list(prompt.token_ids))
    boi, eoi = tokens.index("<|begin_of_image|>"), tokens.index("<|end_of_image|>")
    assert (
        tokens[boi - 2 : boi] == ["<|user|>", "Ċ"]
        and eoi - boi - 1 == engine._prompts.processor.num_image_tokens
    )


def test_thudm_vision_guide_style_offload_map_gives_the_same_tokens(engine: ProcessEngine) -> None:
    guide = {
        "transformer.embedding": "cpu",
        "transformer.vision": "cpu",
        "transformer.h.0": "disk",
        "transformer.h.1": "cpu",
        "transformer.encoder.final_layernorm": "cpu",
        "transformer.output_layer": "cpu",
    }
    prompt = engine.render_chat([ChatMessage(role="user", text="Describe it.", images=(picture(7),))])
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    expected = stream(engine, [prompt], params)
    split = create_engine(load_spec("tiny-glm4v").model_copy(update={"device_map": guide}))
    try:
        assert split.info.parallel == "layers"
        assert (
            stream(
                split,
                [split.render_chat([ChatMessage(role="user", text="Describe it.", images=(picture(7),))])],
                params,
            )
            == expected
        )
    finally:
        split.close()
