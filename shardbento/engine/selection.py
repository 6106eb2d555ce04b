"""Which engine serves a spec: `engine: auto` picks vLLM when it can serve the model, else transformers."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Literal

from shardbento.catalog import ModelSpec
from shardbento.engine.vllm.args import gpu_refusal, model_architectures

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineChoice:
    name: Literal["transformers", "vllm"]
    reason: str


def vllm_refusal(spec: ModelSpec, model_path: str | None = None) -> str | None:
    """Why vLLM cannot serve this spec here (not importable, wrong platform, GPU, model); None if it can."""
    try:
        if getattr(importlib.import_module("vllm"), "__file__", None) is None:  # a namespace, not vLLM
            raise ModuleNotFoundError("No module named 'vllm'")
        from vllm import ModelRegistry
        from vllm.platforms import current_platform
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
        return f"vllm is not importable ({type(exc).__name__}: {exc})"
    if spec.num_gpus == 0 and not current_platform.is_cpu():
        return f"the model runs on CPU but the installed vLLM is a {current_platform.device_name} build"
    if spec.num_gpus > 0:
        if not current_platform.is_cuda_alike():
            return f"gpus is {spec.gpus} but the installed vLLM is a {current_platform.device_name} build"
        capability = current_platform.get_device_capability()
        reason = gpu_refusal((capability.major, capability.minor) if capability else None)
        if reason:
            return reason
    supported = set(ModelRegistry.get_supported_archs())
    archs = model_architectures(model_path) if model_path else []
    if archs and not supported & set(archs):
        return f"vLLM has no implementation of {', '.join(archs)}"
    return None


def choose_engine(spec: ModelSpec, model_path: str | None = None) -> EngineChoice:
    if spec.engine != "auto":
        return EngineChoice(spec.engine, f"the catalog entry says engine: {spec.engine}")
    reason = vllm_refusal(spec, model_path)
    if reason is None:
        return EngineChoice("vllm", "engine: auto and vLLM supports this model and device")
    return EngineChoice("transformers", f"engine: auto fell back to transformers because {reason}")
