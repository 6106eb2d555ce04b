"""Unit tests for shardbento.tiny.models: offline, deterministic, sharded tiny-model generation."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shardbento.tiny import models as tiny
from shardbento.tiny.tokenizer import ENDOFTEXT, IM_END, IM_START, IMAGE

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="module")
def llama_dir(cache_dir: Path) -> Path:
    return tiny.ensure_generated("tiny-llama", cache_dir)


@pytest.fixture(scope="module")
def llava_dir(cache_dir: Path) -> Path:
    return tiny.ensure_generated("tiny-llava", cache_dir)


def _file_hashes(directory: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}


def _leftovers(cache: Path) -> list[str]:
    return [path.name for path in cache.iterdir() if ".tmp-" in path.name]


def test_ensure_generated_is_deterministic(llama_dir: Path, tmp_path: Path) -> None:
    import torch

    rng_state = torch.get_rng_state()
    again = tiny.ensure_generated("tiny-llama", tmp_path)
    assert torch.equal(torch.get_rng_state(), rng_state), "generation must not consume the global RNG"
    assert again.name == llama_dir.name
    first, second = _file_hashes(llama_dir), _file_hashes(again)
    assert [name for name in first if name.endswith(".safetensors")]
    assert first == second


def test_ensure_generated_writes_sharded_safetensors(llama_dir: Path) -> None:
    shards = sorted(path.name for path in llama_dir.glob("*.safetensors"))
    index = json.loads((llama_dir / "model.safetensors.index.json").read_text())
    assert len(shards) >= 2
    assert sorted(set(index["weight_map"].values())) == shards


def test_ensure_generated_names_dir_by_recipe_and_digest(llama_dir: Path) -> None:
    recipe = tiny.RECIPES["tiny-llama"]
    assert llama_dir.name == f"tiny-llama-{tiny.recipe_digest(recipe)}"
    assert tiny.recipe_digest(dataclasses.replace(recipe, seed=1)) != tiny.recipe_digest(recipe)


def test_ensure_generated_reuses_existing_dir(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_args: object) -> None:
        raise AssertionError("regenerated an existing model")

    monkeypatch.setattr(tiny, "_build", fail)
    assert tiny.ensure_generated("tiny-llama", llama_dir.parent) == llama_dir


def test_ensure_generated_rejects_unknown_recipe(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tiny-llama") as error:
        tiny.ensure_generated("no-such-model", tmp_path)
    assert "no-such-model" in str(error.value)
    assert not list(tmp_path.iterdir())


def test_ensure_generated_keeps_winner_of_rename_race(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_build = tiny._build
    final_dir = tmp_path / f"tiny-llama-{tiny.recipe_digest(tiny.RECIPES['tiny-llama'])}"

    def build_then_lose_race(recipe: tiny.Recipe, out_dir: Path) -> None:
        real_build(recipe, out_dir)
        shutil.copytree(out_dir, final_dir)
        (final_dir / "winner").touch()

    monkeypatch.setattr(tiny, "_build", build_then_lose_race)
    assert tiny.ensure_generated("tiny-llama", tmp_path) == final_dir
    assert (final_dir / "winner").exists()
    assert _leftovers(tmp_path) == []


def test_ensure_generated_removes_temp_dir_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_build(*_args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny, "_build", broken_build)
    with pytest.raises(RuntimeError, match="boom"):
        tiny.ensure_generated("tiny-llama", tmp_path)
    assert _leftovers(tmp_path) == []
    assert not [path for path in tmp_path.iterdir() if path.is_dir()]


def test_cache_root_reads_environment_when_called(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDBENTO_CACHE", str(tmp_path))
    assert tiny.cache_root() == tmp_path
    monkeypatch.delenv("SHARDBENTO_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tiny.cache_root() == tmp_path / "home" / ".cache" / "shardbento"


def test_tiny_llama_loads_and_generates(llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tokenizer)
    assert (model.config.head_dim, model.config.num_key_value_heads) == (64, 2)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    output = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 4


def test_generation_config_lists_both_eos_ids(llama_dir: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    config = GenerationConfig.from_pretrained(llama_dir)
    im_end_id, endoftext_id = tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    assert config.eos_token_id == [im_end_id, endoftext_id]
    assert config.pad_token_id == endoftext_id == tokenizer.pad_token_id
    assert tokenizer.eos_token_id == im_end_id
    assert config.do_sample is False


def test_chat_template_renders_chatml(llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = f"{IM_START}system\nBe brief.{IM_END}\n{IM_START}user\nHi{IM_END}\n{IM_START}assistant\n"
    assert prompt == expected
    assert tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_START, IM_END]) == [0, 1, 2]


def test_tiny_llava_generates_from_image(llava_dir: Path) -> None:
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(llava_dir)
    model = AutoModelForImageTextToText.from_pretrained(llava_dir)
    image = Image.new("RGB", (40, 24), (200, 30, 30))
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE)
    assert model.config.image_token_index == image_token_id
    assert int((inputs["input_ids"] == image_token_id).sum()) == model.config.image_seq_length
    output = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 3


def test_tiny_llava_processor_call_matches_chat_template(llava_dir: Path) -> None:
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(llava_dir)
    image = Image.new("RGB", (32, 32), (0, 0, 255))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == f"{IM_START}user\n{IMAGE}Describe.{IM_END}\n{IM_START}assistant\n"
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 32, 32)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}


def test_tiny_llava_saves_llava_hf_weight_names(llava_dir: Path) -> None:
    index = json.loads((llava_dir / "model.safetensors.index.json").read_text())
    vision_keys = [key for key in index["weight_map"] if key.startswith("vision_tower.")]
    assert vision_keys
    assert all(key.startswith("vision_tower.vision_model.") for key in vision_keys)


def test_bench_llama_quiets_special_and_unprintable_rows(cache_dir: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoTokenizer

    model_dir = tiny.ensure_generated("bench-llama", cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    with safe_open(model_dir / index["weight_map"]["lm_head.weight"], "pt") as shard:
        lm_head = shard.get_tensor("lm_head.weight")
    zero_rows = set((lm_head.abs().sum(dim=1) == 0).nonzero().flatten().tolist())
    byte_tab, byte_a = tokenizer.convert_tokens_to_ids(["ĉ", "a"])  # ByteLevel spellings of "\t" and "a"
    assert {0, 1, 2, byte_tab} <= zero_rows
    assert byte_a not in zero_rows
    assert len(zero_rows) < len(tokenizer) // 10


def test_tiny_qwen_loads(cache_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny.ensure_generated("tiny-qwen", cache_dir))
    assert type(model).__name__ == "Qwen2ForCausalLM"


@pytest.mark.slow
def test_ensure_generated_concurrent_processes_generate_once(tmp_path: Path) -> None:
    script = (
        "import logging, sys; from pathlib import Path; logging.basicConfig(level=logging.INFO);"
        "from shardbento.tiny.models import ensure_generated; print(ensure_generated('tiny-llama', Path(sys.argv[1])))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for _ in range(2)
    ]
    results = [worker.communicate(timeout=120) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], results
    assert len({stdout for stdout, _ in results}) == 1
    assert sum(stderr.count(b"Building tiny model") for _, stderr in results) == 1
    assert _leftovers(tmp_path) == []


def test_tiny_qwen3_has_qwen3s_template_and_thinking_tokens(cache_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shardbento.tiny.templates import QWEN3_CHAT_TEMPLATE

    model_dir = tiny.ensure_generated("tiny-qwen3", cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template == QWEN3_CHAT_TEMPLATE
    for tag in ("<think>", "</think>", "<tool_call>", "</tool_call>"):
        (token,) = tokenizer.encode(tag, add_special_tokens=False)
        assert tokenizer.decode([token], skip_special_tokens=True) == tag  # kept in decoded text
    messages = [{"role": "user", "content": "Hi"}]
    off = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert type(AutoModelForCausalLM.from_pretrained(model_dir)).__name__ == "Qwen3ForCausalLM"


def test_tiny_glm45_has_glm45_airs_layout_template_and_tokens(cache_dir: Path) -> None:
    """GLM-4.5-Air's hub layout at a tiny size: config.json in the release's field names, one tensor per
    expert, the multi-token-prediction layer after the last decoder layer, the added tokens after the
    vocabulary in the release's order, and its chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shardbento.tiny.templates import GLM45_ADDED_TOKENS, GLM45_CHAT_TEMPLATE, GLM45_TEXT_TOKENS

    model_dir = tiny.ensure_generated("tiny-glm45", cache_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "glm4_moe" and "rope_parameters" not in config
    assert (config["rope_theta"], config["partial_rotary_factor"]) == (1_000_000.0, 0.5)
    layers, experts = config["num_hidden_layers"], config["n_routed_experts"]
    names = set(json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"])
    for expert in range(experts):
        assert f"model.layers.{layers - 1}.mlp.experts.{expert}.gate_proj.weight" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names  # first_k_dense_replace: a dense first layer
    mtp = f"model.layers.{layers}."
    assert {
        mtp + n for n in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.head.weight")
    } <= names
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template == GLM45_CHAT_TEMPLATE
    first = len(tokenizer) - len(GLM45_ADDED_TOKENS)
    assert tokenizer.convert_ids_to_tokens(list(range(first, len(tokenizer)))) == list(GLM45_ADDED_TOKENS)
    for tag in GLM45_TEXT_TOKENS:
        (token,) = tokenizer.encode(tag, add_special_tokens=False)
        assert tokenizer.decode([token], skip_special_tokens=True) == tag  # kept in decoded text
    eos = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])
    assert config["eos_token_id"] == eos
    messages = [{"role": "user", "content": "Hi"}]
    off = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert off == "[gMASK]<sop><|user|>\nHi/nothink<|assistant|>\n<think></think>"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model).__name__ == "Glm4MoeForCausalLM"
    assert model.config.get_text_config().rope_parameters["partial_rotary_factor"] == 0.5
