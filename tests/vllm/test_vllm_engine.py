"""The vLLM engine in-process: greedy tokens equal the transformers engine's, also with tensor parallel 2."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from shardbento.catalog import ModelSpec, load_spec
from shardbento.engine import create_engine
from shardbento.engine.base import ChatMessage, SamplingParams
from shardbento.engine.selection import choose_engine
from shardbento.engine.vllm.engine import VLLMEngine
from shardbento.plan.engines import catalog_choice, vllm_architectures
from shardbento.plan.source import resolve_source

MESSAGES = [ChatMessage(role="user", text="Count the shards of the model.")]


def tokens(engine, loop: asyncio.AbstractEventLoop, params: SamplingParams) -> list[int]:
    async def collect() -> list[int]:
        prompt = engine.render_chat(MESSAGES)
        return [t async for delta in engine.stream(prompt, params, "req-test") for t in delta.token_ids]

    return loop.run_until_complete(collect())


def test_vllm_engine_tp2_greedy_tokens_equal_transformers(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % (os.cpu_count() or 1)) for i in range(2))
    )
    spec = load_spec("tiny-llama-tp2").model_copy(update={"engine": "vllm"})  # 2 CPU ranks
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    hf = create_engine(load_spec("tiny-llama"))
    try:
        expected = tokens(hf, loop, params)
    finally:
        hf.close()
    engine = VLLMEngine.load(spec)
    try:
        assert engine.info.parallel.startswith("tp=2,pp=1")
        assert engine.render_chat(MESSAGES).token_ids == hf.render_chat(MESSAGES).token_ids
        assert tokens(engine, loop, params) == expected
    finally:
        engine.close()


def test_create_engine_auto_falls_back_when_vllm_refuses_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Llama whose config names an architecture vLLM lacks: vLLM refuses it at load, `auto` falls back
    with a warning saying why, and the transformers engine loads it by model_type."""
    from shardbento.engine import _create_vllm_engine
    from shardbento.tiny.models import ensure_generated

    model_dir = tmp_path / "unknown-arch"
    shutil.copytree(ensure_generated("tiny-llama"), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(
        json.dumps({**config, "architectures": ["ShardbentoToyForCausalLM"]})
    )
    spec = ModelSpec(
        name="unknown-arch", source=str(model_dir), kind="text", engine="auto", max_model_len=256
    )
    with caplog.at_level(logging.INFO, logger="shardbento"):
        assert _create_vllm_engine(spec) is None
        engine = create_engine(spec)
    try:
        assert engine.info.engine == "transformers"
        assert "engine: auto fell back to transformers because vLLM refused it" in caplog.text
    finally:
        engine.close()


def test_choose_engine_auto_is_transformers_on_cpu_and_vllm_on_gpus_it_can_drive() -> None:
    """`auto` never picks the CPU build; on a GPU entry it is vLLM when the installed vLLM can drive
    the GPUs this process sees, and falls back saying so when it cannot (this CPU build)."""
    spec = load_spec("tiny-llava")
    assert spec.engine == "auto"
    assert "it runs on CPU" in choose_engine(spec, resolve_source(spec)).reason
    on_gpu = spec.model_copy(update={"gpus": 1, "device": "cuda"})
    assert catalog_choice(on_gpu).name == "vllm"
    choice = choose_engine(on_gpu, resolve_source(spec))
    assert choice.name == "transformers"
    assert (
        "fell back to transformers because gpus is 1 but the installed vLLM is a cpu build" in choice.reason
    )


def test_choose_engine_auto_vision_goes_to_transformers_when_vllm_lacks_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["ShardbentoToyForImageTextToText"]}))
    spec = ModelSpec(name="toy-vision", source=str(tmp_path), kind="vision", engine="auto", gpus=1)
    choice = choose_engine(spec, str(tmp_path))
    assert choice.name == "transformers"
    assert choice.reason.endswith("vLLM has no implementation of ShardbentoToyForImageTextToText")


def test_committed_architectures_are_the_installed_vllms() -> None:
    """engine: auto decides from shardbento/plan/vllm_architectures.txt what a GPU image carries:
    it must be this vLLM's registry (`make vllm-architectures` rewrites it)."""
    from vllm import ModelRegistry

    assert vllm_architectures() == set(ModelRegistry.get_supported_archs())


def test_catalog_quantization_methods_are_the_installed_vllms() -> None:
    """The catalog refuses a vllm.quantization the pinned vLLM would refuse at startup, from a list
    committed in the package: it must be this vLLM's own (which has no bitsandbytes method)."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    from shardbento.catalog import vllm_quantization_methods
    from shardbento.plan.memory import VLLM_QUANT

    assert list(vllm_quantization_methods()) == QUANTIZATION_METHODS
    assert set(VLLM_QUANT) <= set(QUANTIZATION_METHODS)  # every method the planner counts exists
