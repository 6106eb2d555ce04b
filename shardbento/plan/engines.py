"""Which engine a catalog entry runs where it is deployed, decided from the catalog alone (what a Bento's
image must carry, what `plan` budgets for): `engine: auto` is vLLM on GPUs where the pinned vLLM
implements the model's architecture, else the transformers engine. No torch, no vllm import."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shardbento.catalog import ModelSpec
from shardbento.plan.memory import BENTO_GPU_KINDS, GPU_KINDS

# Compute capability below which auto prefers transformers: Volta (7.0) and Turing (7.5) lack the
# kernels vLLM's fast paths need (FlashAttention-2, "no kernel image is available").
MIN_AUTO_CAPABILITY = (8, 0)

ARCHITECTURES_FILE = Path(__file__).resolve().parent / "vllm_architectures.txt"


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
    from shardbento.plan.source import config_path  # imports torch only to generate a tiny model

    try:
        return list(json.loads(config_path(spec).read_text()).get("architectures") or [])
    except (PlanError, OSError, ValueError):
        return []


def gpu_refusal(capability: tuple[int, int] | None) -> str | None:
    """Why `auto` keeps a GPU of this compute capability on the transformers engine, or None."""
    if capability is None:
        return None
    if capability < MIN_AUTO_CAPABILITY:
        found = ".".join(map(str, capability))
        wanted = ".".join(map(str, MIN_AUTO_CAPABILITY))
        return f"GPU compute capability {found} is below {wanted} (Volta/Turing lack vLLM's fast kernels)"
    return None
