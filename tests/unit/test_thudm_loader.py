"""THUDM checkpoints as transformers' GLM: the config and tensor mapping, the converted weights against a
ChatGLM forward pass written here from the checkpoint's own tensors, device maps, and the loader decision."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shardbento.catalog import load_spec
from shardbento.plan.memory import PlanError, load_config
from shardbento.plan.preflight import run_preflight
from shardbento.plan.source import config_path
from shardbento.plan.tp_plan import tp_plan_available
from shardbento.thudm.convert import native_checkpoint
from shardbento.thudm.layout import (
    CheckpointError,
    glm_config,
    loader_decision,
    native_names,
    translate_device_map,
)
from shardbento.tiny.models import ensure_generated


def thudm_tensors(source: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(source.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as reader:
            tensors.update({name: reader.get_tensor(name) for name in reader.keys()})  # noqa: SIM118
    return tensors


def chatglm_logits(
    source: Path, ids: list[int], embeds: torch.Tensor | None = None, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """ChatGLM's forward from its config and tensor names: RMSNorm, fused qkv with bias, multi-query
    groups, rotary on the first half of each head with interleaved pairs (base 10000 x rope_ratio),
    SwiGLU over the chunked dense_h_to_4h, the separate output layer. `embeds` and `positions` replace
    the token embeddings and 0..n-1 (GLM-4V's image splice)."""
    config = json.loads((source / "config.json").read_text())
    w = thudm_tensors(source)
    length = len(ids) if embeds is None else embeds.shape[0]
    heads, groups, dim = config["num_attention_heads"], config["multi_query_group_num"], config["kv_channels"]
    eps = config["layernorm_epsilon"]

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    rot = dim // 2
    base = 10000.0 * config.get("rope_ratio", 1)
    where = torch.arange(length) if positions is None else positions
    angles = where[:, None].float() / base ** (torch.arange(0, rot, 2).float() / rot)
    cos, sin = angles.cos(), angles.sin()

    def rope(x: torch.Tensor) -> torch.Tensor:  # [n, heads, dim]
        pairs = x[..., :rot].reshape(*x.shape[:-1], rot // 2, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        c, s = cos[:, None, :], sin[:, None, :]
        turned = torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1).flatten(-2)
        return torch.cat([turned, x[..., rot:]], dim=-1)

    h = w["transformer.embedding.word_embeddings.weight"][ids] if embeds is None else embeds
    mask = torch.full((length, length), float("-inf")).triu(1)
    for layer in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{layer}."
        x = norm(h, w[p + "input_layernorm.weight"])
        qkv = (
            x @ w[p + "self_attention.query_key_value.weight"].T
            + w[p + "self_attention.query_key_value.bias"]
        )
        q, k, v = qkv.split([heads * dim, groups * dim, groups * dim], dim=-1)
        q, k = rope(q.view(-1, heads, dim)), rope(k.view(-1, groups, dim))
        k = k.repeat_interleave(heads // groups, dim=1)
        v = v.view(-1, groups, dim).repeat_interleave(heads // groups, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / dim**0.5 + mask
        attended = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(length, -1)
        h = h + attended @ w[p + "self_attention.dense.weight"].T
        x = norm(h, w[p + "post_attention_layernorm.weight"])
        gate, up = (x @ w[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        h = h + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.dense_4h_to_h.weight"].T
    h = norm(h, w["transformer.encoder.final_layernorm.weight"])
    return h @ w["transformer.output_layer.weight"].T


@pytest.mark.parametrize("recipe", ["tiny-chatglm3", "tiny-glm4"])
def test_thudm_loader_converted_glm_computes_the_chatglm_forward(recipe: str) -> None:
    from transformers import AutoModelForCausalLM

    source = ensure_generated(recipe)
    model = AutoModelForCausalLM.from_pretrained(native_checkpoint(source), dtype=torch.float32)
    assert type(model).__name__ == "GlmForCausalLM"
    ids = [3, 500, 17, 900, 42, 1000, 7, 64, 333, 12]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, chatglm_logits(source, ids), atol=2e-5, rtol=1e-4)


def test_thudm_loader_conversion_keeps_each_shard_and_splits_qkv() -> None:
    source = ensure_generated("tiny-glm4")
    converted = native_checkpoint(source)
    original = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    native = json.loads((converted / "model.safetensors.index.json").read_text())["weight_map"]
    for name, shard in original.items():
        for target in native_names(name):
            assert native[target] == shard, target  # converted shard by shard: the same file holds it
    qkv = thudm_tensors(source)["transformer.encoder.layers.1.self_attention.query_key_value.weight"]
    with safe_open(converted / native["model.layers.1.self_attn.k_proj.weight"], framework="pt") as reader:
        k = reader.get_tensor("model.layers.1.self_attn.k_proj.weight")
    heads, groups, dim = 4, 2, 64
    torch.testing.assert_close(k, qkv[heads * dim : (heads + groups) * dim])


def test_thudm_loader_maps_the_config_fields() -> None:
    config = json.loads((ensure_generated("tiny-glm4") / "config.json").read_text())
    native = glm_config(config)
    assert native["rope_parameters"]["rope_theta"] == 10000.0 * config["rope_ratio"]
    assert native["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert (native["num_key_value_heads"], native["head_dim"]) == (config["multi_query_group_num"], 64)
    assert native["vocab_size"] == config["padded_vocab_size"] and native["attention_bias"] is True
    with pytest.raises(CheckpointError, match="rmsnorm"):
        glm_config({**config, "rmsnorm": False})
    with pytest.raises(CheckpointError, match="no place"):
        native_names("transformer.prefix_encoder.embedding.weight")


def test_thudm_loader_translates_guide_device_maps() -> None:
    guide = {
        "transformer.embedding": 0,
        "transformer.h.0": 0,
        "transformer.encoder.layers.1": 1,
        "lm_head": 1,
    }
    guide["transformer.encoder.final_layernorm"] = 1
    assert translate_device_map(guide, 2) == {
        "model.embed_tokens": 0,
        "model.layers.0": 0,
        "model.layers.1": 1,
        "lm_head": 1,
        "model.norm": 1,
        "model.rotary_emb": 0,
    }
    with pytest.raises(CheckpointError, match="valid keys: transformer.encoder.layers.N"):
        translate_device_map({"transformer.blocks.0": 0}, 2)
    with pytest.raises(CheckpointError, match="layers 0..1"):
        translate_device_map({"transformer.h.2": 0}, 2)


def test_thudm_loader_preflight_refuses_an_unknown_device_map_key() -> None:
    spec = load_spec("tiny-glm4").model_copy(update={"device_map": {"transformer.layer.0": "cpu"}})
    with pytest.raises(PlanError, match="names no module of this GLM checkpoint; valid keys"):
        run_preflight(spec)


@pytest.mark.parametrize("name", ["chatglm3-6b", "glm-4-9b-chat", "glm-4-9b", "glm-4v-9b"])
def test_thudm_loader_hub_entries_decide_offline_from_their_config(name: str) -> None:
    spec = load_spec(name)
    config = load_config(config_path(spec))
    decision = loader_decision(config, spec.kind, spec.trust_remote_code)
    assert decision.model_class in ("GlmForCausalLM", "Glm4vForConditionalGeneration")
    assert not spec.trust_remote_code
    assert tp_plan_available(config)  # the native GLM's plan: tensor parallelism works for them
    out = subprocess.run(
        [sys.executable, "-m", "shardbento", "plan", name],
        capture_output=True,
        text=True,
        check=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    ).stdout
    assert f"loader: {decision.model_class}" in out and "converted to a fast tokenizer" in out


def test_thudm_loader_glm4v_loads_natively_and_untrusted_remote_code_fails_early() -> None:
    spec = load_spec("glm-4v-9b")
    decision = loader_decision(load_config(config_path(spec)), spec.kind, spec.trust_remote_code)
    assert (decision.kind, decision.model_class) == ("chatglm-vision", "Glm4vForConditionalGeneration")
    tp = load_spec("tiny-glm4v").model_copy(update={"gpus": 2, "device": "cpu", "parallel": "tensor"})
    assert run_preflight(tp).mode == "tensor"  # GLM's plan shards the language model; the tower is replicated
    remote = {
        "model_type": "internlm2",
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {"AutoConfig": "x"},
    }
    with pytest.raises(CheckpointError, match="trust_remote_code is false"):
        loader_decision(remote, "text", trust_remote_code=False)
    assert loader_decision(remote, "text", trust_remote_code=True).kind == "remote-code"


@pytest.mark.parametrize("name", ["chatglm3-6b", "glm-4-9b-chat", "glm-4-9b", "glm-4v-9b"])
def test_thudm_loader_hub_entry_startup_offline_reaches_the_decision_then_fails_clearly(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Startup with the hub offline: preflight plans from the shipped config.json and logs the loader
    (class and tokenizer); the download is where it stops, with the repository and the fix named."""
    import logging

    from shardbento.engine import create_engine

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("SHARDBENTO_CACHE", str(tmp_path / "cache"))
    spec = load_spec(name).model_copy(update={"gpus": 0, "dtype": "float32"})
    with caplog.at_level(logging.INFO, logger="shardbento"), pytest.raises(CheckpointError) as failure:
        create_engine(spec)
    assert f"cannot fetch {spec.source}@{spec.revision}" in str(failure.value)
    assert "HF_HUB_OFFLINE" in str(failure.value)
    assert "loader: Glm" in caplog.text and "converted to a fast tokenizer" in caplog.text
