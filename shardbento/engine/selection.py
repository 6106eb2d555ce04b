"""Which engine serves a spec: `engine: auto` is vLLM where it implements the model on that GPU, else the
transformers engine. Decided twice from the same rules: from the catalog alone (what a Bento's image must
carry), and at startup with what this process can import and see."""

from __future__ import annotations

import functools
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shardbento.catalog import ModelSpec
from shardbento.engine.vllm.args import gpu_refusal, model_architectures
from shardbento.plan.memory import BENTO_GPU_KINDS, GPU_KINDS

ARCHITECTURES_FILE = Path(__file__).resolve().parent / "vllm" / "architectures.txt"


@dataclass(frozen=True, slots=True)
class EngineChoice:
    name: Literal["transformers", "vllm"]
    reason: str


@functools.cache
def vllm_architectures() -> frozenset[str]:
    """The architectures the pinned vLLM implements (`make vllm-architectures` writes the file)."""
    lines = ARCHITECTURES_FILE.read_text().splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def catalog_choice(spec: ModelSpec, architectures: list[str] | None = None) -> EngineChoice:
    """The engine the entry runs where it is deployed, from the catalog alone: `architectures` are the
    checkpoint's (by default read from the config.json planning reads, when there is one)."""
    if spec.engine != "auto":
        return EngineChoice(spec.engine, f"the catalog entry says engine: {spec.engine}")
    reason = _auto_refusal(spec, spec_architectures(spec) if architectures is None else architectures)
    if reason is not None:
        return EngineChoice("transformers", f"engine: auto serves it on the transformers engine: {reason}")
    return EngineChoice("vllm", "engine: auto and vLLM implements the model on this GPU")


def _auto_refusal(spec: ModelSpec, architectures: list[str]) -> str | None:
    """Why `auto` does not pick vLLM for this entry, or None."""
    if spec.num_gpus == 0:
        return "it runs on CPU (vLLM's CPU build serves engine: vllm entries, for tests)"
    if spec.quantization != "none":
        return f"quantization: {spec.quantization} is the transformers engine's (vLLM's is vllm.quantization)"
    if spec.device_map is not None or spec.parallel == "layers":
        return "a layer split (device_map or parallel: layers) is the transformers engine's"
    kind = GPU_KINDS.get(BENTO_GPU_KINDS.get(spec.gpu_type or "", ""))
    refusal = gpu_refusal(kind[1] if kind else None)
    if refusal is not None:
        return refusal
    if architectures and not set(architectures) & vllm_architectures():
        return f"vLLM has no implementation of {', '.join(architectures)}"
    return None


def spec_architectures(spec: ModelSpec) -> list[str]:
    """The architectures of the checkpoint's config.json (shipped, local or generated); [] if none."""
    from shardbento.plan.memory import PlanError
    from shardbento.plan.source import config_path

    try:
        return list(json.loads(config_path(spec).read_text()).get("architectures") or [])
    except (PlanError, OSError, ValueError):
        return []


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
