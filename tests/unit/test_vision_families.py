"""The tiny Mllama and Qwen2.5-VL checkpoints in their hub layouts, their processors (no torchvision),
their chat templates fed plain strings where they take them, and the KV memory rule's cross-attention
share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from vision_cases import picture

from shardbento.catalog import ServingLimits, load_spec
from shardbento.engine.base import ChatMessage
from shardbento.engine.hf.preprocess import load_preprocessor, takes_string_content
from shardbento.plan.kvpool import kv_pool
from shardbento.plan.memory import GIB, load_config
from shardbento.plan.source import checkpoint_path, config_path
from shardbento.plan.tp_plan import tp_plan_available
from shardbento.tiny.models import ensure_generated
from shardbento.tiny.vision_templates import LLAMA32_VISION_CHAT_TEMPLATE, QWEN2_VL_CHAT_TEMPLATE


def preprocessor(name: str):
    spec = load_spec(name)
    return load_preprocessor(spec, checkpoint_path(spec))


def tensor_names(directory: Path) -> set[str]:
    return set(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"])


def test_vision_families_tiny_mllama_is_in_metas_layout() -> None:
    """Meta's tensor names, `<|image|>` the first id past the text vocabulary (the logits' width), and
    the processor tiling a wide image into several 32 px tiles with the aspect ratio's id."""
    directory = ensure_generated("tiny-mllama")
    config = json.loads((directory / "config.json").read_text())
    names = tensor_names(directory)
    assert {"language_model.lm_head.weight", "multi_modal_projector.weight"} <= names
    assert any(n.startswith("language_model.model.layers.1.cross_attn.") for n in names)
    assert any(n.startswith("vision_model.global_transformer.") for n in names)
    assert config["image_token_index"] == config["text_config"]["vocab_size"]
    prompts = preprocessor("tiny-mllama")
    image = [ChatMessage(role="user", text="What is it?", images=(picture(1, width=96, height=32),))]
    inputs = prompts.render_chat(image).inputs
    assert inputs["pixel_values"].shape[-2:] == (32, 32) and inputs["pixel_values"].shape[2] == 4
    assert int(inputs["aspect_ratio_mask"].sum()) == 3  # a 3:1 picture: three tiles of the four
    assert inputs["cross_attention_mask"].shape[-1] == 4


def test_vision_families_tiny_qwen_is_in_qwens_layout_and_loads_without_torchvision() -> None:
    directory = ensure_generated("tiny-qwen2.5-vl")
    config = json.loads((directory / "config.json").read_text())
    assert "text_config" not in config and config["rope_scaling"]["type"] == "mrope"  # the hub's flat file
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= tensor_names(directory)
    assert any(n.startswith("visual.blocks.0.") for n in tensor_names(directory))
    prompts = preprocessor("tiny-qwen2.5-vl")
    assert not hasattr(prompts.processor, "video_processor")
    with pytest.raises(ImportError):
        __import__("torchvision")
    prompt = prompts.render_chat([ChatMessage(role="user", text="Hi", images=(picture(2, 80, 48),))])
    image_tokens = prompt.token_ids.count(config["image_token_id"])
    assert image_tokens == int(prompt.inputs["image_grid_thw"].prod()) // 4 and 1 <= image_tokens <= 16
    assert prompts.vocab_size < config["vocab_size"]  # the embedding is padded past the tokenizer


@pytest.mark.parametrize("name", ["tiny-mllama", "tiny-qwen2.5-vl"])
def test_vision_families_text_messages_reach_the_template_as_strings(name: str) -> None:
    """A system message and text-only turns go to the template as strings (Meta's trims the system
    message's text; given parts it printed a Python list), a turn with an image as parts."""
    prompts = preprocessor(name)
    system = ChatMessage(role="system", text="  Answer in one word.  ")
    text = prompts.chat_text([system, ChatMessage(role="user", text="Which city is bigger?")])
    assert "Answer in one word." in text and "'type'" not in text and "[{" not in text
    image = prompts.chat_text([ChatMessage(role="user", text="What?", images=(picture(3),))])
    assert ("<|image|>" if name == "tiny-mllama" else "<|image_pad|>") in image


def test_vision_families_templates_taking_only_parts_get_parts() -> None:
    assert takes_string_content(LLAMA32_VISION_CHAT_TEMPLATE)
    assert takes_string_content(QWEN2_VL_CHAT_TEMPLATE)
    parts_only = (
        "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c.text }}{% endfor %}"
    )
    assert not takes_string_content(parts_only)


def test_vision_families_cross_attention_state_takes_at_most_half_the_kv_memory() -> None:
    """Every slot gets its image keys while they take at most half the KV memory; past that as many as
    half holds (at least one); with kv_cache_tokens the pool is that and every slot gets a state."""
    per_token, small, large = {"cpu": 1024}, {"cpu": 1024 * 1024}, {"cpu": GIB}
    limits = ServingLimits(kv_cache_gib=4, max_num_seqs=32)
    roomy = kv_pool(limits, per_token, max_num_seqs=32, max_model_len=4096, bytes_per_image_seq=small)
    assert roomy.image_rows == 32
    assert roomy.tokens == min(32 * 4096, (4 * GIB - 32 * 1024 * 1024) // 1024)
    capped = kv_pool(limits, per_token, max_num_seqs=32, max_model_len=1 << 20, bytes_per_image_seq=large)
    assert capped.image_rows == 2 and capped.tokens == 2 * GIB // 1024
    gpus = kv_pool(
        limits,
        {"cuda:0": 1024, "cuda:1": 1024},
        max_num_seqs=32,
        max_model_len=1 << 20,
        free_bytes={"cuda:0": 10 * GIB, "cuda:1": 6 * GIB},
        bytes_per_image_seq={"cuda:0": GIB // 2, "cuda:1": GIB // 2},
    )
    assert gpus.image_rows == 6  # the smaller GPU's half: 3 GiB of 0.5 GiB sequences
    assert gpus.tokens == 3 * GIB // 1024
    fixed = ServingLimits(kv_cache_tokens=4096, max_num_seqs=8)
    assert (
        kv_pool(fixed, per_token, max_num_seqs=8, max_model_len=4096, bytes_per_image_seq=large).image_rows
        == 8
    )
    assert kv_pool(limits, per_token, max_num_seqs=32, max_model_len=4096).image_rows == 0


def test_vision_families_mllama_has_a_tensor_parallel_plan() -> None:
    assert tp_plan_available(load_config(config_path(load_spec("llama-3.2-90b-vision-instruct"))))
    assert tp_plan_available(load_config(config_path(load_spec("qwen2.5-vl-7b-instruct"))))
