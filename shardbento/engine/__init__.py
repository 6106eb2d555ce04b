"""Engine selection; concrete engines are imported lazily so the HTTP layer needs no torch."""

from __future__ import annotations

import logging

from shardbento.catalog import ModelSpec
from shardbento.engine.base import Engine

logger = logging.getLogger(__name__)


def create_engine(spec: ModelSpec) -> Engine:
    """Load the engine the spec asks for; heavy imports happen here, not at import time."""
    from shardbento.plan.preflight import run_preflight

    plan = run_preflight(spec)  # a spec that cannot work fails here, before any weight loads
    if spec.engine != "transformers":
        engine = _create_vllm_engine(spec)
        if engine is not None:
            return engine
    if plan.mode == "tensor":
        from shardbento.engine.tp.engine import TPEngine

        return TPEngine.load(spec, plan)
    from shardbento.engine.hf.engine import HFEngine

    return HFEngine.load(spec, plan)


def _create_vllm_engine(spec: ModelSpec) -> Engine | None:
    """vLLM for `engine: vllm`; for `auto`, vLLM if it can serve the model, else None (one log line why)."""
    from shardbento.engine.selection import choose_engine
    from shardbento.plan.source import resolve_source

    choice = choose_engine(spec, resolve_source(spec))
    fell_back = choice.name == "transformers"  # only auto falls back; a warning so it shows by default
    logger.log(
        logging.WARNING if fell_back else logging.INFO,
        "model %s: %s engine (%s)",
        spec.name,
        choice.name,
        choice.reason,
    )
    if choice.name == "transformers":
        return None
    from shardbento.engine.vllm.engine import VLLMEngine

    if spec.engine == "vllm":
        try:
            return VLLMEngine.load(spec)
        except ImportError as exc:
            raise RuntimeError(
                f"model {spec.name} has engine: vllm but vllm is not importable ({exc}); install "
                "env/vllm-cuda.txt (GPUs) or env/vllm-cpu.txt (CPU), or set engine: auto or transformers"
            ) from exc
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
