"""The lean decode forward (engine/batch/lean.py): switched on by its load-time check on the loaded model,
the plain forward's logits to the bit on the families it runs, and the plain forward kept for any model
it does not recognise, any module with a hook, and any model on which the check fails."""

from __future__ import annotations

import logging

import pytest
import torch

from shardbento.catalog import ModelSpec, ServingLimits, load_spec
from shardbento.engine.batch import lean
from shardbento.engine.batch.prefill import PrefillChunk
from shardbento.engine.batch.runner import ModelRunner
from shardbento.engine.hf.loading import load_model
from shardbento.plan.preflight import run_preflight

PROMPTS = (tuple(range(3, 40)), (5, 9, 14), tuple(range(50, 70)))


def runner_of(name: str, before_pool=None) -> ModelRunner:
    spec = ModelSpec.model_validate({"name": name, "source": f"generated:{name}", "kind": "text"})
    runner = ModelRunner(load_model(spec, run_preflight(spec)).model, 4, 256)
    if before_pool is not None:
        before_pool(runner.model)
    with torch.inference_mode():
        runner.allocate_pool(ServingLimits())
    return runner


@torch.inference_mode()
def decode_run(runner: ModelRunner) -> list[torch.Tensor]:
    """Three prompts of different lengths decoded together, the middle one finished half way (the last
    row moves into its slot), then the other two on: every step's logits."""
    runner.prefill([PrefillChunk(i, p, 0, i) for i, p in enumerate(PROMPTS)])
    steps = [runner.decode([11 + step, 12 + step, 13 + step]) for step in range(4)]
    runner.release([1])
    steps += [runner.decode([30 + step, 31 + step]) for step in range(4)]
    runner.release([0, 1])
    return steps


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen", "tiny-qwen3"])
def test_lean_decode_serves_the_plain_forwards_logits_to_the_bit(name: str, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="shardbento.engine.batch.selfcheck"):
        runner = runner_of(name)
    assert isinstance(runner.lean, lean.LeanDecode)
    assert "decode steps: the lean forward" in caplog.text
    calls = []
    runner.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    fast = decode_run(runner)
    assert len(calls) == 1  # the prefill; no decode step called the model's forward
    runner.lean = None
    plain = decode_run(runner)
    assert len(calls) == 1 + 1 + 8  # the plain path: one model forward a step
    assert same(fast, plain)


def test_lean_decode_leaves_a_hooked_model_on_its_own_forward(caplog) -> None:
    """A forward hook (an accelerate layer split's, a user's) runs only through
    nn.Module.__call__: the lean forward would skip it, so the model keeps its own forward, hook applied."""

    def hook(runner_model):
        runner_model.model.layers[1].mlp.register_forward_hook(lambda module, args, out: out + 1.0)

    with caplog.at_level(logging.INFO, logger="shardbento.engine.batch.selfcheck"):
        hooked = runner_of("tiny-llama", before_pool=hook)
    assert hooked.lean is None
    assert "decode steps: the model's own forward (forward hooks on model.layers.1.mlp)" in caplog.text
    assert not same(decode_run(hooked), decode_run(runner_of("tiny-llama")))  # the hook counts


def test_lean_decode_check_failing_keeps_the_plain_forward(monkeypatch, caplog) -> None:
    """A lean forward that got the model wrong (here: its last layer skipped) fails the check."""
    monkeypatch.setattr(lean.LeanDecode, "__init__", _one_layer_short)
    with caplog.at_level(logging.INFO, logger="shardbento.engine.batch.selfcheck"):
        runner = runner_of("tiny-llama")
    assert runner.lean is None
    assert "decode steps: the model's own forward (against the model's own forward" in caplog.text
    assert "best tokens DIFFER" in caplog.text or "of the spread" in caplog.text


def _one_layer_short(self, model) -> None:
    original_init(self, model)
    self._layers = self._layers[:-1]


original_init = lean.LeanDecode.__init__


def test_lean_decode_refuses_what_it_does_not_run() -> None:
    spec = load_spec("tiny-llama")
    model = load_model(spec, run_preflight(spec)).model
    assert lean.why_not_lean(model) is None
    model.config._attn_implementation = "eager"
    assert lean.why_not_lean(model) == "attention 'eager' is not SDPA"
    model.config._attn_implementation = "sdpa"
    model.config.layer_types = ["sliding_attention"] * model.config.num_hidden_layers
    assert lean.why_not_lean(model) == "sliding-window attention"
    model.config.layer_types = ["full_attention"] * model.config.num_hidden_layers
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        assert lean.why_not_lean(model) == "global module forward hooks"
    finally:
        handle.remove()
    glm = load_spec("tiny-glm4")
    assert "is not one of LlamaForCausalLM" in lean.why_not_lean(load_model(glm, run_preflight(glm)).model)
