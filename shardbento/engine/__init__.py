"""Engine selection; concrete engines are imported lazily so the HTTP layer needs no torch."""

from __future__ import annotations

import logging

from shardbento.catalog import ModelSpec
from shardbento.engine.base import Engine

logger = logging.getLogger(__name__)


def create_engine(spec: ModelSpec) -> Engine:
    """Load the engine the spec asks for; heavy imports happen here, not at import time. The engine is
    chosen first (one log line says which and why), then preflight plans for it: a spec that cannot work
    fails there, before any weight loads."""
    from shardbento.engine.selection import choose_engine
    from shardbento.plan.preflight import run_preflight
    from shardbento.plan.source import resolve_source

    choice = choose_engine(spec, resolve_source(spec))
    fell_back = spec.engine == "auto" and "fell back" in choice.reason  # vLLM was expected here
    logger.log(
        logging.WARNING if fell_back else logging.INFO,
        "model %s: %s engine (%s)",
        spec.name,
        choice.name,
        choice.reason,
    )
    if choice.name == "vllm":
        run_preflight(spec, engine="vllm")  # vLLM's quantization and memory share are what it counts
        engine = _create_vllm_engine(spec)
        if engine is not None:
            return engine
    from shardbento.engine.core.engine import ProcessEngine

    return ProcessEngine.load(spec, run_preflight(spec, engine="transformers"))


def _create_vllm_engine(spec: ModelSpec) -> Engine | None:
    """vLLM for `engine: vllm` (it must load); for `auto`, None when vLLM refuses it at load, so the
    transformers engine serves it (a warning says why)."""
    try:
        from shardbento.engine.vllm.engine import VLLMEngine
    except ImportError as exc:
        if spec.engine == "vllm":
            raise RuntimeError(
                f"model {spec.name} has engine: vllm but vllm is not importable ({exc}); install "
                "env/vllm-cuda.txt (GPUs) or env/vllm-cpu.txt (CPU), or set engine: auto or transformers"
            ) from exc
        logger.warning("model %s: engine: auto fell back to transformers (%s)", spec.name, exc)
        return None
    if spec.engine == "vllm":
        return VLLMEngine.load(spec)
    try:
        return VLLMEngine.load(spec)
    except Exception as exc:  # noqa: BLE001 - auto means "vLLM if it works": any refusal falls back
        logger.warning(
            "model %s: engine: auto fell back to transformers because vLLM refused it (%s: %s)",
            spec.name,
            type(exc).__name__,
            exc,
        )
        return None
