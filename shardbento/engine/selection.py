"""Which engine serves a spec at startup: the catalog's choice (plan.engines), and for `auto` whether the
installed vLLM can really serve it here (importable, built for this device, the model in its registry)."""

from __future__ import annotations

import importlib

from shardbento.catalog import ModelSpec
from shardbento.engine.vllm.args import model_architectures
from shardbento.plan.engines import EngineChoice, catalog_choice, gpu_refusal


def vllm_refusal(spec: ModelSpec, model_path: str | None = None) -> str | None:
    """Why the installed vLLM cannot serve this spec here (not importable, wrong platform, GPU, model)."""
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
    """The engine that serves the spec in this process: the catalog's choice, and for `auto` whether
    the installed vLLM can really serve it on the GPUs this process sees."""
    archs = model_architectures(model_path) if model_path else None
    choice = catalog_choice(spec, archs or None)
    if spec.engine != "auto" or choice.name == "transformers":
        return choice
    reason = vllm_refusal(spec, model_path)
    if reason is None:
        return choice
    return EngineChoice("transformers", f"engine: auto fell back to transformers because {reason}")
