"""quantization: int8 | int4 really quantizes on the transformers engine, and the plan counts it right."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from shardbento.catalog import load_spec
from shardbento.engine import create_engine
from shardbento.engine.base import ChatMessage, SamplingParams
from shardbento.engine.hf.loading import load_model
from shardbento.plan.memory import PlanError, budget, checkpoint_quantization, load_config, model_shape
from shardbento.plan.preflight import run_preflight
from shardbento.plan.source import resolve_source


def loaded_weight_bytes(model) -> int:
    """Every parameter's and buffer's storage, plus bitsandbytes' block scales (kept beside the weight)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            for part in (state.absmax, getattr(state, "state2", None) and state.state2.absmax):
                if part is not None:
                    total += part.numel() * part.element_size()
        scales = getattr(p, "SCB", None)
        if scales is not None:
            total += scales.numel() * scales.element_size()
    return total


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_tiny_model_loads_serves_and_matches_the_plan(quantization: str, caplog) -> None:
    spec = load_spec("tiny-llama").model_copy(update={"quantization": quantization})
    engine = create_engine(spec)
    try:
        prompt = engine.render_chat([ChatMessage(role="user", text="Hello there")])

        async def run():
            return [
                d async for d in engine.stream(prompt, SamplingParams(max_tokens=6, ignore_eos=True), "q")
            ]

        deltas = asyncio.run(run())
    finally:
        engine.close()
    assert sum(len(d.token_ids) for d in deltas) == 6
    loaded = load_model(spec, run_preflight(spec))  # what the engine's rank loaded, here to be weighed
    with torch.inference_mode():
        loaded.model(**prompt.inputs)  # two forwards: bitsandbytes would log its cast for each int8 linear
        loaded.model(**prompt.inputs)
    casts = [r for r in caplog.records if r.getMessage().startswith("MatMul8bitLt: inputs will be cast")]
    assert len(casts) <= 1  # bitsandbytes says it on every forward of every int8 linear: said once
    measured = loaded_weight_bytes(loaded.model)
    linears = [type(m).__name__ for m in loaded.model.modules() if "Linear" in type(m).__name__]
    assert ("Linear8bitLt" if quantization == "int8" else "Linear4bit") in linears
    shape = model_shape(load_config(Path(resolve_source(spec)) / "config.json"))
    planned = budget(shape, dtype="float32", quantization=quantization, max_model_len=spec.max_model_len)
    full = budget(shape, dtype="float32", max_model_len=spec.max_model_len)
    assert abs(measured - planned.weight_bytes) <= 0.10 * planned.weight_bytes, (
        measured,
        planned.weight_bytes,
    )
    assert measured < full.weight_bytes * 0.9  # it really shrank


def test_quantized_mixture_of_experts_keeps_its_experts_and_the_plan_says_so() -> None:
    """bitsandbytes quantizes GLM-4.5's attention, dense and shared-expert linears, not its routed
    experts (3-D tensors in transformers): the plan counts them at dtype, and counting them quantized
    would be off by more than the tolerance."""
    spec = load_spec("tiny-glm45").model_copy(update={"quantization": "int4"})
    loaded = load_model(spec, run_preflight(spec))
    experts = loaded.model.model.layers[1].mlp.experts
    assert {p.dtype for p in experts.parameters()} == {torch.float32}
    assert type(loaded.model.model.layers[1].mlp.shared_experts.gate_proj).__name__ == "Linear4bit"
    measured = loaded_weight_bytes(loaded.model)
    shape = model_shape(load_config(Path(resolve_source(spec)) / "config.json"))
    args = {"dtype": "float32", "quantization": "int4", "max_model_len": spec.max_model_len}
    planned = budget(shape, **args, bitsandbytes=True).weight_bytes
    assert abs(measured - planned) <= 0.10 * planned, (measured, planned)
    assert abs(measured - budget(shape, **args).weight_bytes) > 0.10 * planned


def test_quantized_tensor_parallel_fails_early_with_the_alternative() -> None:
    spec = load_spec("tiny-llama-tp2").model_copy(update={"quantization": "int4"})
    with pytest.raises(PlanError, match="parallel: layers .* or engine: vllm"):
        run_preflight(spec)


@pytest.mark.parametrize(
    ("quant", "expected"),
    [
        ({"quant_method": "awq", "bits": 4}, "int4"),
        ({"quant_method": "gptq", "bits": 8}, "int8"),
        ({"quant_method": "fp8"}, "fp8"),
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float"}}},
            },
            "fp8",
        ),
        ({"quant_method": "bitnet"}, None),
    ],
)
def test_planner_counts_pre_quantized_checkpoints(quant: dict, expected: str | None) -> None:
    config = {
        **load_config(Path(resolve_source(load_spec("tiny-llama"))) / "config.json"),
        "quantization_config": quant,
    }
    shape = model_shape(config)
    assert checkpoint_quantization(config) == expected == shape.checkpoint_quantization
