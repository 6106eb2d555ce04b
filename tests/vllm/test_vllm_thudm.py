"""vLLM's own ChatGLM implementation on the original THUDM-layout tiny checkpoints (with the converted
tokenizer) against the transformers engine's native GLM conversion: the same prompt ids, the same
greedy tokens. An implementation we did not write checks the conversion."""

from __future__ import annotations

import asyncio

import pytest

from shardbento.catalog import load_spec
from shardbento.engine import create_engine
from shardbento.engine.base import ChatMessage, SamplingParams
from shardbento.engine.vllm.engine import VLLMEngine

MESSAGES = [ChatMessage(role="user", text="你好, count the shards of the model.")]


def tokens(engine, loop: asyncio.AbstractEventLoop, prompt, params: SamplingParams) -> list[int]:
    async def collect() -> list[int]:
        return [t async for delta in engine.stream(prompt, params, "req-thudm") for t in delta.token_ids]

    return loop.run_until_complete(collect())


@pytest.mark.parametrize("name", ["tiny-chatglm3", "tiny-glm4"])
def test_vllm_thudm_greedy_tokens_equal_the_native_conversion(
    name: str, loop: asyncio.AbstractEventLoop
) -> None:
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    hf = create_engine(load_spec(name))
    try:
        chat, completion = hf.render_chat(MESSAGES), hf.encode("1, 2, 3, 4,")
        expected = [tokens(hf, loop, prompt, params) for prompt in (chat, completion)]
    finally:
        hf.close()
    engine = VLLMEngine.load(load_spec(name).model_copy(update={"engine": "vllm"}))
    try:
        assert engine.render_chat(MESSAGES).token_ids == chat.token_ids
        assert engine.encode("1, 2, 3, 4,").token_ids == completion.token_ids
        assert [tokens(engine, loop, p, params) for p in (chat, completion)] == expected
    finally:
        engine.close()
