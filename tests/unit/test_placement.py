"""Device maps: the Plan's layer split in the checkpoint's module names, CPU, one GPU, a manual map."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.utils import check_device_map

from shardbento.catalog import load_spec
from shardbento.engine.hf.loading import auto_gpu_dtype
from shardbento.engine.hf.placement import (
    _mapped_device,
    device_map_for,
    hidden_states_device,
    input_device,
    meta_model,
    module_device,
)
from shardbento.plan.memory import CUDA_CONTEXT_BYTES, GIB, GpuKind, model_shape
from shardbento.plan.preflight import run_preflight
from shardbento.plan.sharding import plan_spec
from shardbento.plan.source import config_path, resolve_source
from shardbento.plan.split import device_map_from_shares


def test_placement_cpu_spec_maps_to_cpu() -> None:
    spec = load_spec("tiny-llama")
    assert device_map_for(spec, run_preflight(spec), "unused", torch.float32) == "cpu"


def test_placement_manual_map_wins() -> None:
    spec = load_spec("tiny-llama").model_copy(update={"device_map": {"": "cpu"}})
    assert device_map_for(spec, run_preflight(spec), "unused", torch.float32) == {"": "cpu"}


def _two_gpu_plan(name: str):
    """The model's plan on two GPUs that each hold only 90% of its weights beside their headroom
    (within gpu_memory_utilization)."""
    spec = load_spec(name).model_copy(update={"gpus": 2, "parallel": "layers"})
    shape = model_shape(json.loads(config_path(spec).read_text()))
    roomy = plan_spec(spec, shape, GpuKind("big", 1000 * GIB, (9, 0)), dtype="float32", max_model_len=256)
    need = roomy.budget
    held = CUDA_CONTEXT_BYTES + (need.kv_bytes + need.activation_bytes) // 2 + int(0.9 * need.weight_bytes)
    memory = int(held / spec.limits.gpu_memory_utilization)  # what the engine may fill of each GPU
    plan = plan_spec(spec, shape, GpuKind("small", memory, (9, 0)), dtype="float32", max_model_len=256)
    return spec, resolve_source(spec), plan


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llava"])
def test_placement_layer_split_is_the_plans_in_real_module_names(name: str) -> None:
    spec, path, plan = _two_gpu_plan(name)
    assert plan.mode == "layers" and [s.gpu for s in plan.shares] == [0, 1]
    assert all(share.weight_bytes > 0 for share in plan.shares)  # the split uses both GPUs
    model = meta_model(spec, path, torch.float32)
    device_map = device_map_from_shares(plan.shares, model)
    check_device_map(model, device_map)  # every parameter is placed
    names = {id(m): n for n, m in model.named_modules()}
    blocks = {"embed": names[id(model.get_input_embeddings())]}
    if "lm_head" in {b for share in plan.shares for b in share.other}:
        blocks["lm_head"] = names[id(model.get_output_embeddings())]
    for share in plan.shares:
        if share.first_layer is not None:
            for layer in range(share.first_layer, share.last_layer + 1):
                assert [v for k, v in device_map.items() if k.endswith(f"layers.{layer}")] == [share.gpu]
        for block in share.other:
            if block in blocks:
                assert device_map[blocks[block]] == share.gpu
            elif block == "vision":
                assert device_map["model.vision_tower"] == share.gpu


@torch.inference_mode()
def test_placement_planned_split_loads_as_mapped(tmp_path) -> None:
    """transformers takes the planned map as it is: with GPU 0 as the CPU and GPU 1 offloaded to disk,
    the model loads in exactly that layout and computes what it computes unsplit."""
    from transformers import AutoModelForCausalLM

    spec, path, plan = _two_gpu_plan("tiny-llama")
    planned = device_map_from_shares(plan.shares, meta_model(spec, path, torch.float32))
    on_host = {name: "cpu" if gpu == 0 else "disk" for name, gpu in planned.items()}
    split = AutoModelForCausalLM.from_pretrained(path, device_map=on_host, offload_folder=str(tmp_path))
    whole = AutoModelForCausalLM.from_pretrained(path)
    assert split.hf_device_map == on_host
    ids = torch.tensor([[5, 9, 14, 20, 33]])
    assert torch.allclose(split(input_ids=ids).logits, whole(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize(
    ("device_map", "module", "expected"),
    [
        ({"model.embed_tokens": 1, "model.layers": 2}, "model.embed_tokens", torch.device("cuda", 1)),
        ({"model": 0, "lm_head": 3}, "model.embed_tokens", torch.device("cuda", 0)),
        ({"": "cpu"}, "model.embed_tokens", torch.device("cpu")),
        ({"model.embed_tokens": "disk"}, "model.embed_tokens", None),
        ({"lm_head": 0}, "model.embed_tokens", None),
    ],
)
def test_placement_mapped_device_longest_prefix(device_map, module, expected) -> None:
    assert _mapped_device(device_map, module) == expected


def _split_meta_model(device_map: dict):
    """tiny-llama's architecture on `meta` with the device map a layer split would record."""
    spec = load_spec("tiny-llama")
    model = meta_model(spec, resolve_source(spec), torch.float32)
    model.hf_device_map = device_map
    return model


class _Hook:
    """What accelerate attaches to an offloaded module: its weights live elsewhere, it runs here."""

    def __init__(self, execution_device) -> None:
        self.execution_device = execution_device


def test_placement_layer_split_inputs_go_to_the_embedding_and_logit_indices_to_the_last_layer() -> None:
    model = _split_meta_model(
        {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1, "lm_head": 1}
    )
    assert input_device(model) == torch.device("cuda", 0)
    assert hidden_states_device(model) == torch.device("cuda", 1)


def test_placement_tied_head_beside_the_embedding_still_indexes_on_the_norms_device() -> None:
    model = _split_meta_model({"model.embed_tokens": 0, "model.layers": 1, "model.norm": 2, "lm_head": 0})
    assert hidden_states_device(model) == torch.device("cuda", 2)


def test_placement_offloaded_embedding_runs_where_its_hook_says_not_on_meta() -> None:
    model = _split_meta_model(
        {"model.embed_tokens": "disk", "model.layers": 0, "model.norm": 0, "lm_head": 0}
    )
    assert model.get_input_embeddings().weight.device.type == "meta"
    model.get_input_embeddings()._hf_hook = _Hook(0)
    assert input_device(model) == torch.device("cuda", 0)
    assert module_device(model, model.get_input_embeddings()) == torch.device("cuda", 0)


def test_placement_unplaced_embedding_is_an_error_not_meta() -> None:
    model = _split_meta_model({"model.embed_tokens": "disk", "model.layers": 0})
    with pytest.raises(ValueError, match="no device"):
        input_device(model)


def test_placement_plain_model_uses_its_weights_device() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    model = LlamaForCausalLM(config)
    assert input_device(model) == hidden_states_device(model) == torch.device("cpu")


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [
        ([(9, 0)], "bfloat16"),
        ([(8, 0), (8, 6)], "bfloat16"),
        ([(7, 5)], "float16"),
        ([(8, 0), (7, 0)], "float16"),
    ],
)
def test_placement_auto_dtype_is_bfloat16_only_where_every_gpu_computes_it(capabilities, expected) -> None:
    assert auto_gpu_dtype(capabilities) == expected
