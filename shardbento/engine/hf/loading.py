"""Loading a catalog model's weights with transformers: the dtype, the device map, CPU kernels."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shardbento.catalog import ModelSpec
from shardbento.engine.hf.cpu_kernels import keep_freed_memory, pack_linear_weights
from shardbento.engine.hf.placement import device_map_for, input_device
from shardbento.engine.hf.preprocess import Preprocessor, load_preprocessor
from shardbento.plan.memory import NATIVE_BF16_CAPABILITY
from shardbento.plan.sharding import Plan
from shardbento.plan.source import checkpoint_path

logger = logging.getLogger(__name__)

INT8_OUTLIER_THRESHOLD = 6.0
INT8_CAST_LOGGER = "bitsandbytes.autograd._functions"
INT8_CAST_MESSAGE = "MatMul8bitLt: inputs will be cast"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(spec: ModelSpec) -> torch.dtype:
    """The spec's dtype; `auto` is float32 on CPU. On GPUs `auto` and `bfloat16` are bfloat16 where every
    GPU the model uses computes it natively (Ampere, 8.0, and later), else float16: what preflight's note
    and the planner say."""
    if spec.num_gpus == 0 or spec.dtype not in ("auto", "bfloat16"):
        return torch.float32 if spec.dtype == "auto" else _DTYPES[spec.dtype]
    capabilities = [torch.cuda.get_device_capability(i) for i in range(spec.num_gpus)]
    return _DTYPES[auto_gpu_dtype(capabilities)]


def auto_gpu_dtype(capabilities: list[tuple[int, int]]) -> str:
    """bfloat16 when every GPU is Ampere (8.0) or later. Not torch.cuda.is_bf16_supported(): it counts
    the emulated bfloat16 of a T4 or V100 as support, which runs several times slower than float16."""
    return "bfloat16" if all(c >= NATIVE_BF16_CAPABILITY for c in capabilities) else "float16"


@dataclass(frozen=True)
class LoadedModel:
    """A model's weights, placed as its Plan says, with its Preprocessor and the device its inputs go to."""

    model: Any
    prompts: Preprocessor
    plan: Plan
    input_device: torch.device
    devices: tuple[str, ...]
    parallel: str


def model_class(kind: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    import shardbento.engine.hf.glm4v  # noqa: F401 - registers GLM-4V's converted model type

    return AutoModelForImageTextToText if kind == "vision" else AutoModelForCausalLM


def load_model(spec: ModelSpec, plan: Plan) -> LoadedModel:
    """Load weights where the plan puts them (every check that can fail ran in preflight, before this)."""
    path = checkpoint_path(spec)
    dtype = resolve_dtype(spec)
    device_map = device_map_for(spec, plan, path, dtype)
    common = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    quantized = quantization_config(spec, dtype)
    if quantized is not None:
        common["quantization_config"] = quantized
    offload = {"offload_folder": str(Path(path) / ".offload")} if _uses_disk(device_map) else {}
    logger.info("loading %s from %s (%s, device_map=%s)", spec.name, path, dtype, device_map)
    model = model_class(spec.kind).from_pretrained(
        path, dtype=dtype, device_map=device_map, **common, **offload
    )
    model.eval()
    if (
        quantized is None
        and spec.cpu_kernels == "onednn"
        and any(p.device.type == "cpu" for p in model.parameters())
    ):
        keep_freed_memory()  # first: the kernels' load-time timing runs under the allocator that serves
        pack_linear_weights(model)
    return LoadedModel(
        model=model,
        prompts=load_preprocessor(spec, path, model.config, getattr(model, "generation_config", None)),
        plan=plan,
        input_device=input_device(model),
        devices=tuple(sorted({str(p.device) for p in model.parameters()})),
        parallel="layers" if isinstance(device_map, dict) and len(set(device_map.values())) > 1 else "none",
    )


def quantization_config(spec: ModelSpec, dtype: torch.dtype) -> Any:
    """bitsandbytes' weight-only config for `quantization: int8 | int4` (NF4, computing in the model's
    dtype): it runs on CPUs and CUDA GPUs alike (measured here: torchao's int4 needs a CPU layout this
    torch lacks, and its int8 weights did not shrink the parameters), and keeps lm_head and norms in dtype."""
    if spec.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if spec.quantization == "int8":
        quiet_int8_cast_warning()
        # llm_int8_threshold stays at LLM.int8()'s 6.0: activations beyond it are outliers, multiplied in
        # float16 beside the int8 product (on CUDA finding them costs a device-to-host sync per layer; 0.0
        # would skip that but degrades models of ~7B and more, whose outlier features are systematic).
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_OUTLIER_THRESHOLD)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=True,  # block scales quantized too: ~0.52 bytes a weight, as planned
    )


class _OnceFilter(logging.Filter):
    """Lets a message through once, then drops its repeats (bitsandbytes logs its cast on every call)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self._prefix = prefix
        self._seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self._prefix):
            return True
        seen, self._seen = self._seen, True
        return not seen


def quiet_int8_cast_warning() -> None:
    """bitsandbytes warns that int8 matmuls cast bfloat16/float32 activations to float16 on every forward
    of every quantized linear (hundreds of lines per decode step at 8B): said once per process."""
    bnb_logger = logging.getLogger(INT8_CAST_LOGGER)
    if not any(isinstance(f, _OnceFilter) for f in bnb_logger.filters):
        bnb_logger.addFilter(_OnceFilter(INT8_CAST_MESSAGE))


def _uses_disk(device_map: str | dict[str, Any]) -> bool:
    return isinstance(device_map, dict) and "disk" in device_map.values()
