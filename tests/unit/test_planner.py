"""Planner arithmetic against the meta-device model and accelerate's own split, for real shapes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest

from shardbento.catalog import CATALOG_DIR, load_spec
from shardbento.plan.memory import (
    CUDA_CONTEXT_BYTES,
    GIB,
    PlanError,
    budget,
    load_config,
    model_shape,
    parse_gpus,
)
from shardbento.plan.sharding import plan_spec, render
from shardbento.plan.source import CONFIG_DIR, config_path
from shardbento.plan.split import GpuShare, layer_blocks, split_layers
from shardbento.thudm.layout import glm_config, is_thudm

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")

NATIVE = [
    ("llama-3.1-8b-instruct", [6 * GIB] * 3),
    ("llama-3.1-70b-instruct", [40 * GIB] * 4),
    ("llama-3.2-90b-vision-instruct", [60 * GIB] * 4),
    ("glm-4-9b-chat", [10 * GIB] * 2),  # THUDM layout: the native GLM the loader converts it to
    ("chatglm3-6b", [5 * GIB] * 3),
    ("qwen2.5-vl-7b-instruct", [6 * GIB] * 3),
    ("glm-4.5-air", [60 * GIB] * 4),  # a dense first layer, then 128 experts per layer
]


def _config(name: str) -> dict:
    return load_config(CONFIG_DIR / f"{name}.json")


def meta_model(config: dict[str, Any], dtype: str = "bfloat16") -> Any:
    """The architecture with no weights allocated; raises for remote-code models (not available offline)."""
    import torch
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    if is_thudm(config):
        config = glm_config(config)
    fields = {k: v for k, v in config.items() if not k.startswith("_") and k != "auto_map"}
    model_config = AutoConfig.for_model(**fields)
    architecture = getattr(transformers, config["architectures"][0])
    with init_empty_weights():
        return architecture._from_config(model_config, dtype=getattr(torch, dtype))


def accelerate_split(model: Any, max_memory: list[int], dtype: str = "bfloat16") -> list[GpuShare]:
    """accelerate.infer_auto_device_map on fake GPUs, summarised like planner.split_layers."""
    import torch
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    device_map = infer_auto_device_map(
        model,
        max_memory=dict(enumerate(max_memory)),
        no_split_module_classes=list(model._no_split_modules or []),
        dtype=getattr(torch, dtype),
    )
    sizes = compute_module_sizes(model, dtype=getattr(torch, dtype))
    shares = []
    for gpu in range(len(max_memory)):
        names = [name for name, placed in device_map.items() if placed == gpu]
        layers = [int(m[1]) for name in names if (m := _LAYER.search(name))]
        shares.append(
            GpuShare(
                gpu=gpu,
                first_layer=min(layers) if layers else None,
                last_layer=max(layers) if layers else None,
                other=tuple(name for name in names if not _LAYER.search(name)),
                weight_bytes=sum(sizes[name] for name in names),
            )
        )
    return shares


@pytest.mark.parametrize(("name", "max_memory"), NATIVE)
def test_planner_matches_meta_model_and_accelerate(name: str, max_memory: list[int]) -> None:
    config = _config(name)
    model = meta_model(config)
    exact = sum(p.numel() for p in model.parameters())
    shape = model_shape(config)
    assert abs(shape.num_params - exact) / exact < 0.005
    ours = split_layers(layer_blocks(shape, "bfloat16", "none"), max_memory)
    theirs = accelerate_split(model, max_memory)
    assert [(s.first_layer, s.last_layer) for s in ours] == [(s.first_layer, s.last_layer) for s in theirs]
    for mine, acc in zip(ours, theirs, strict=True):
        assert abs(mine.weight_bytes - acc.weight_bytes) <= 0.02 * max(acc.weight_bytes, GIB)


@pytest.mark.parametrize(
    "config_class", ["Glm4MoeConfig", "Qwen3MoeConfig", "Qwen2MoeConfig", "MixtralConfig"]
)
def test_planner_counts_each_mixture_of_experts_layout(config_class: str) -> None:
    """transformers' default config of each MoE family (their released models' shapes): experts, shared
    experts, routers and dense layers counted as the meta-device model holds them."""
    import transformers

    config = getattr(transformers, config_class)().to_dict()
    config["architectures"] = [config_class.removesuffix("Config") + "ForCausalLM"]
    exact = sum(p.numel() for p in meta_model(config).parameters())
    shape = model_shape(config)
    assert shape.moe is not None
    assert abs(shape.num_params - exact) / exact < 0.001
    dense_only = model_shape({k: v for k, v in config.items() if "expert" not in k})
    assert dense_only.moe is None and dense_only.num_params < exact / 2  # what counting no experts gave


@pytest.mark.parametrize(
    ("name", "kv_layers"),
    [("llama-3.1-8b-instruct", 32), ("llama-3.1-70b-instruct", 80), ("llama-3.2-90b-vision-instruct", 80)],
)
def test_planner_kv_bytes_per_token(name: str, kv_layers: int) -> None:
    config = _config(name)
    text = config.get("text_config", config)
    need = budget(model_shape(config), dtype="bfloat16", max_model_len=1024)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert need.kv_bytes_per_token == kv_layers * text["num_key_value_heads"] * head_dim * 2 * 2


def test_planner_vision_cross_attention_kv_counted() -> None:
    config = _config("llama-3.2-90b-vision-instruct")
    need = budget(model_shape(config), dtype="bfloat16", max_model_len=8192, max_images=1)
    vision = config["vision_config"]
    tokens = vision["max_num_tiles"] * ((vision["image_size"] // vision["patch_size"]) ** 2 + 1)
    assert need.kv_bytes_per_image == 20 * 8 * 128 * 2 * 2 * tokens


def test_planner_quantization_shrinks_weights() -> None:
    shape = model_shape(_config("llama-3.1-70b-instruct"))
    full = budget(shape, dtype="bfloat16", max_model_len=4096)
    int4 = budget(shape, dtype="bfloat16", quantization="int4", max_model_len=4096)
    assert int4.weight_bytes < full.weight_bytes / 3


def test_planner_tensor_parallel_heads_not_divisible() -> None:
    spec = load_spec("llama-3.1-70b-instruct").model_copy(update={"parallel": "tensor"})
    shape = model_shape(load_config(config_path(spec)))
    with pytest.raises(PlanError, match=r"3 does not divide the 64 attention heads.*\[2, 4, 8"):
        plan_spec(spec, shape, parse_gpus("H100-80GB")[1], num_gpus=3)


def test_planner_not_enough_memory_names_numbers_and_fixes_that_work() -> None:
    """Each fix the message suggests, applied to the entry, plans (and passes preflight's own checks)."""
    spec = load_spec("llama-3.2-90b-vision-instruct").model_copy(update={"gpus": 2})
    shape = model_shape(load_config(config_path(spec)))
    h100 = parse_gpus("H100-80GB")[1]
    with pytest.raises(PlanError) as caught:
        plan_spec(spec, shape, h100, tp_capable=False)
    message = str(caught.value)
    assert "165 GiB weights" in message and "bfloat16" in message and "2 x H100-80GB" in message
    assert "set gpus: 3" in message and "set quantization: int4 and parallel: layers" in message
    assert plan_spec(spec.model_copy(update={"gpus": 3}), shape, h100, tp_capable=False).num_gpus == 3
    quantized = spec.model_copy(update={"quantization": "int4", "parallel": "layers"})
    assert plan_spec(quantized, shape, h100, tp_capable=False).mode == "layers"


@pytest.mark.parametrize(
    ("name", "gpus", "fix"),
    [
        ("llama-3.1-70b-instruct", "1xA100-80GB", "set quantization: int4"),
        ("llama-3.1-70b-instruct", "2xA100-40GB", "set quantization: int4 and parallel: layers"),
        ("glm-4.5-air", "2xH100-80GB", "set vllm.quantization: fp8"),
        ("glm-4.5-air", "1xH100-80GB", None),  # bitsandbytes leaves its routed experts (93 %) be
    ],
)
def test_planner_vllm_entries_are_offered_quantizations_that_run(
    name: str, gpus: str, fix: str | None
) -> None:
    """A vLLM entry that does not fit is offered vLLM's fp8, else bitsandbytes' int4 on the transformers
    engine (the pinned vLLM has no bitsandbytes method), each planned as that engine stores it; applied,
    the fix plans on the engine `auto` then picks."""
    from shardbento.plan.engines import catalog_choice

    count, kind = parse_gpus(gpus)
    spec = load_spec(name).model_copy(update={"gpus": count})
    shape = model_shape(_config(name))
    with pytest.raises(PlanError) as caught:
        plan_spec(spec, shape, kind, engine="vllm")
    fixes = re.search(r"gpu_memory_utilization [0-9.]+\): (.*)$", str(caught.value)).group(1).split(" or ")
    assert not any("bitsandbytes" in f for f in fixes)
    quantizations = [f for f in fixes if "quantization" in f]
    assert quantizations == ([fix] if fix else [])
    if fix is None:
        return
    fixed = spec.model_copy(update={"quantization": "int4", "parallel": "layers" if count > 1 else "auto"})
    if "vllm" in fix:
        fixed = spec.model_copy(update={"vllm": spec.vllm.model_copy(update={"quantization": "fp8"})})
    engine = catalog_choice(fixed).name
    assert engine == ("vllm" if "vllm" in fix else "transformers")
    assert plan_spec(fixed, shape, kind, engine=engine).budget.quantization == (
        "fp8" if "vllm" in fix else "int4"
    )


def test_planner_bitsandbytes_leaves_routed_experts_at_dtype() -> None:
    """bitsandbytes replaces nn.Linear layers; transformers keeps a mixture's routed experts in 3-D
    tensors, so they stay bfloat16 (measured on tiny-glm45 in test_quantization.py)."""
    shape = model_shape(_config("glm-4.5-air"))
    full = budget(shape, dtype="bfloat16", max_model_len=4096)
    int4 = budget(shape, dtype="bfloat16", quantization="int4", max_model_len=4096, bitsandbytes=True)
    assert shape.routed_expert_params == 45 * 128 * 3 * 4096 * 1408  # 45 sparse layers of 128 experts
    assert (
        int4.weight_bytes
        == full.weight_bytes
        - (shape.num_params - shape.routed_expert_params - 2 * shape.embed_params - shape.hidden_size) * 1.5
    )
    vllm_int4 = budget(shape, dtype="bfloat16", quantization="int4", max_model_len=4096)  # AWQ: experts too
    assert vllm_int4.weight_bytes < int4.weight_bytes / 3


def test_planner_vllm_counts_its_own_quantization_and_memory_share() -> None:
    """A vLLM entry is planned with vllm.quantization and vllm.gpu_memory_utilization: 70B in bf16 does
    not fit one H200, in fp8 it does; the fix named for vLLM is vLLM's own setting."""
    spec = load_spec("llama-3.1-70b-instruct").model_copy(update={"gpus": 1, "gpu_type": "nvidia-h200-141gb"})
    shape = model_shape(load_config(config_path(spec)))
    h200 = parse_gpus("H200-141GB")[1]
    with pytest.raises(PlanError, match="set vllm.quantization: fp8"):
        plan_spec(spec, shape, h200, engine="vllm")
    fp8 = spec.model_copy(update={"vllm": spec.vllm.model_copy(update={"quantization": "fp8"})})
    plan = plan_spec(fp8, shape, h200, engine="vllm")
    assert (plan.engine, plan.budget.quantization) == ("vllm", "fp8")
    assert plan.gpu_memory_utilization == spec.vllm.gpu_memory_utilization
    squeezed = fp8.model_copy(update={"vllm": fp8.vllm.model_copy(update={"gpu_memory_utilization": 0.5})})
    with pytest.raises(PlanError, match="gpu_memory_utilization 0.5"):
        plan_spec(squeezed, shape, h200, engine="vllm")
    assert plan_spec(fp8, shape, h200, engine="transformers", check=False).budget.quantization == "none"


def test_planner_every_catalog_model_plans_offline() -> None:
    for path in sorted(CATALOG_DIR.glob("*.yaml")):
        if path.stem.startswith("tiny-"):
            continue  # generated models are planned by the CLI test below
        spec = load_spec(path.stem)
        plan = plan_spec(
            spec, model_shape(load_config(config_path(spec))), parse_gpus(spec.gpu_type or "A100-80GB")[1]
        )
        assert plan.num_gpus == max(spec.gpus, 1)
        assert sum(plan.per_gpu_bytes()) <= plan.num_gpus * plan.gpu.memory_bytes


@pytest.mark.slow  # a subprocess
def test_plan_cli_90b_on_four_a100_is_tensor_parallel_with_cross_attention_counted() -> None:
    """auto picks tensor parallelism for Mllama (shardbento's plan: transformers has none), each rank
    holding a quarter of the language model and the whole vision tower, and the cross-attention keys of
    every slot's image counted beside the pool (0.49 GiB each, all 32 slots: under half the KV memory)."""
    command = [sys.executable, "-m", "shardbento", "plan", "llama-3.2-90b-vision-instruct", "--gpus"]
    text = subprocess.run([*command, "4xA100-80GB"], capture_output=True, text=True, check=True).stdout
    assert "4 x A100-80GB" in text and "mode       tensor (auto: 4 divides the heads" in text
    assert "cross-attn       32 image sequences at once (every slot) x 0.49 GiB" in text
    assert "1/4 of every layer, the whole vision tower" in text
    data = json.loads(
        subprocess.run([*command, "4xA100-80GB", "--json"], capture_output=True, text=True, check=True).stdout
    )
    need = data["budget"]
    assert data["mode"] == "tensor" and data["image_rows"] == 32 and not data["shares"]
    vision = need["vision_weight_bytes"]
    assert 1.5 * GIB < vision < 2 * GIB  # the tower (40 layers of 1280) and its 7680 -> 8192 projector
    rank = (need["weight_bytes"] + need["kv_bytes"] + need["activation_bytes"] - vision) // 4 + vision
    assert data["per_gpu_bytes"] == [rank + CUDA_CONTEXT_BYTES] * 4
    assert abs(data["needed_bytes"] - sum(data["per_gpu_bytes"])) < 4  # the even split rounds down


def test_planner_90b_layer_split_on_four_h100() -> None:
    spec = load_spec("llama-3.2-90b-vision-instruct").model_copy(update={"parallel": "layers"})
    shape = model_shape(_config("llama-3.2-90b-vision-instruct"))
    plan = plan_spec(spec, shape, parse_gpus("H100-80GB")[1], num_gpus=4)
    layers = [(s.first_layer, s.last_layer) for s in plan.shares]
    assert plan.mode == "layers" and layers[0][0] == 0 and layers[-1][1] == 99 and len(layers) == 4
    assert all(b < 80e9 for b in plan.per_gpu_bytes())
    assert plan.image_rows == 32  # each GPU's cross-attention layers keep every slot's image


@pytest.mark.slow  # a subprocess
def test_plan_cli_wrong_gpus_fails_with_fix() -> None:
    command = [sys.executable, "-m", "shardbento", "plan", "llama-3.1-70b-instruct", "--gpus", "1xA100-80GB"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2
    # auto runs it on vLLM: tensor parallel only (3 does not divide its 64 heads), vLLM's own quantization
    assert "set gpus: 4 or set quantization: int4 or" in result.stderr  # bitsandbytes on transformers


def test_planner_kv_pool_is_the_engine_rule_on_each_gpus_leftover() -> None:
    """The pool `plan` prints: kv_cache_tokens when set, else the memory each GPU has left within
    gpu_memory_utilization over a token's KV bytes there (tensor parallel: one rank's share)."""
    spec = load_spec("llama-3.1-70b-instruct")
    shape = model_shape(load_config(config_path(spec)))
    _, gpu = parse_gpus("A100-80GB")
    plan = plan_spec(spec, shape, gpu, num_gpus=4)
    need = plan.budget
    per_gpu_left = int(gpu.memory_bytes * 0.9) - int(need.weight_bytes // 4 * 1.1) - CUDA_CONTEXT_BYTES
    expected = min(
        per_gpu_left // (need.kv_bytes_per_token // 4), spec.limits.max_num_seqs * spec.max_model_len
    )
    assert plan.kv_pool_tokens == expected and "gpu_memory_utilization" in plan.kv_pool_source
    tighter = spec.model_copy(
        update={"limits": spec.limits.model_copy(update={"gpu_memory_utilization": 0.6})}
    )
    assert plan_spec(tighter, shape, gpu, num_gpus=4).kv_pool_tokens < plan.kv_pool_tokens
    fixed = spec.model_copy(update={"limits": spec.limits.model_copy(update={"kv_cache_tokens": 5000})})
    assert plan_spec(fixed, shape, gpu, num_gpus=4).kv_pool_tokens == 5000
    assert "KV pool" in render(plan) and f"{plan.kv_pool_tokens // spec.max_model_len} sequences" in render(
        plan
    )


def test_planner_counts_glm4v_vision_tower_and_adapter() -> None:
    """GLM-4V's vision side tensor by tensor as its checkpoint holds it (EVA2-CLIP tower, the 2x2
    convolution, the GLU projector, boi/eoi): the planner's count is within 0.5 %."""
    config = _config("glm-4v-9b")
    vision, text, ffn = config["vision_config"], config["hidden_size"], config["ffn_hidden_size"]
    width, inner, patch = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    linear = lambda n_in, n_out, bias=True: n_in * n_out + (n_out if bias else 0)  # noqa: E731
    layer = 2 * (2 * width) + linear(width, 3 * width) + linear(width, width)
    layer += linear(width, inner) + linear(inner, width)
    tensors = [
        linear(vision["in_channels"] * patch * patch, width),  # patch embedding
        width + vision["num_positions"] * width,  # cls, positions
        vision["num_hidden_layers"] * layer,
        linear(width * 4, text),  # 2x2 convolution into the text width
        linear(text, text, False) + 2 * text + 2 * linear(text, ffn, False) + linear(ffn, text, False),
        2 * text,  # boi, eoi
    ]
    exact = sum(tensors)
    assert abs(model_shape(config).vision_params - exact) / exact < 0.005


@pytest.mark.parametrize(
    ("gpus", "memory_gb", "capability"),
    [("2xRTX4090-24GB", 24, (8, 9)), ("RTX3090-24GB", 24, (8, 6)), ("A6000-48GB", 48, (8, 6)),
     ("L40S-48GB", 48, (8, 9)), ("A10-24GB", 24, (8, 6))],
)  # fmt: skip
def test_planner_knows_consumer_and_workstation_gpus(gpus: str, memory_gb: int, capability: tuple) -> None:
    _, kind = parse_gpus(gpus)
    assert (kind.memory_bytes, kind.capability) == (memory_gb * 10**9, capability)
    plan = plan_spec(load_spec("chatglm3-6b"), model_shape(_config("chatglm3-6b")), kind, num_gpus=1)
    assert plan.min_gpus_layers == 1  # ChatGLM3-6B in bfloat16 fits one 24 GB card, as the guides run it


@pytest.mark.parametrize(
    ("name", "gpus"),
    [("llama-3.1-70b-instruct", "A100-80GB"), ("llama-3.2-90b-vision-instruct", "H100-80GB"),
     ("glm-4v-9b", "A10G-24GB"), ("llama-3.1-8b-instruct", "T4-16GB")],
)  # fmt: skip
def test_planner_min_gpus_is_where_the_pool_first_holds_a_full_context(name: str, gpus: str) -> None:
    """One rule: at the minimum the KV pool the engine would allocate holds one max_model_len sequence
    in every mode's layout, and one GPU fewer is refused at startup."""
    spec = load_spec(name).model_copy(update={"parallel": "layers"})
    shape, (_, kind) = model_shape(_config(name)), parse_gpus(gpus)
    lowest = plan_spec(spec, shape, kind, num_gpus=1, check=False).min_gpus_layers
    assert lowest is not None
    plan = plan_spec(spec, shape, kind, num_gpus=lowest)
    assert plan.kv_pool_tokens >= spec.max_model_len
    if lowest > 1:
        with pytest.raises(PlanError, match=f"set gpus: {lowest}"):
            plan_spec(spec, shape, kind, num_gpus=lowest - 1)
