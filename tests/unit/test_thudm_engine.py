"""The tiny THUDM-layout models in the transformers engine: batching, chat vs base stops, a guide's map."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from thudm_reference import build_chat_input, sentencepiece_reference, tiktoken_reference

from shardbento.catalog import load_spec
from shardbento.engine import create_engine
from shardbento.engine.base import ChatMessage, SamplingParams
from shardbento.engine.core.engine import ProcessEngine
from shardbento.engine.hf.chatglm3_tokenizer import ConvertedChatGLM3Tokenizer
from shardbento.tiny.models import ensure_generated

QUESTIONS = ["你好, who are you?", "Tell me about the sharded bento.", "1, 2, 3, 4,", "今天天气怎么样？"]


@pytest.fixture(scope="module", params=["tiny-chatglm3", "tiny-glm4"])
def engine(request: pytest.FixtureRequest) -> Iterator[ProcessEngine]:
    engine = create_engine(load_spec(request.param))
    yield engine
    engine.close()


def collect(
    engine: ProcessEngine, prompts: list, params: SamplingParams
) -> list[tuple[list[int], str | None]]:
    """Each prompt's tokens and finish reason, all submitted at once (so they decode in one batch)."""

    async def one(prompt, index: int) -> tuple[list[int], str | None]:
        deltas = [d async for d in engine.stream(prompt, params, f"req-{index}")]
        return [t for d in deltas for t in d.token_ids], deltas[-1].finish_reason

    async def every() -> list[tuple[list[int], str | None]]:
        return list(await asyncio.gather(*(one(p, i) for i, p in enumerate(prompts))))

    return asyncio.run(every())


def chats(engine: ProcessEngine) -> list:
    return [engine.render_chat([ChatMessage(role="user", text=q)]) for q in QUESTIONS]


def test_thudm_engine_batched_greedy_equals_alone(engine: ProcessEngine) -> None:
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    prompts = chats(engine)
    together = collect(engine, prompts, params)
    alone = [collect(engine, [prompt], params)[0] for prompt in prompts]
    assert together == alone
    assert all(len(tokens) == 16 for tokens, _ in together)


def test_thudm_engine_chat_prompt_is_the_models_format(engine: ProcessEngine) -> None:
    tokenizer = engine._prompts.tokenizer
    prompt = engine.render_chat([ChatMessage(role="user", text="你好")])
    tokens = tokenizer.convert_ids_to_tokens(list(prompt.token_ids))
    assert tokens[0] == "[gMASK]" and tokens[1] in ("sop", "<sop>")
    assert tokens[2] == "<|user|>" and tokens[-1] == "<|assistant|>"


CODE = "Why does this fail?\n```python\ndef add(a, b):\n    if a:\n        return a  +  b\n\treturn b\n```"


def test_thudm_engine_code_prompt_is_the_originals_tokens(engine: ProcessEngine) -> None:
    """A served chat prompt with indented code, a system turn and a leading space: the ids the original
    build_chat_input assembles (the reference library on each content, the specials between)."""
    name = engine.info.model
    messages = [{"role": "system", "content": " Answer  briefly."}, {"role": "user", "content": CODE}]
    if name == "tiny-chatglm3":
        encode, specials = sentencepiece_reference(ensure_generated(name))
        assert isinstance(engine._prompts.tokenizer, ConvertedChatGLM3Tokenizer)
    else:
        reference, specials = tiktoken_reference(ensure_generated(name))
        encode = reference.encode_ordinary
    prompt = engine.render_chat([ChatMessage(role=m["role"], text=m["content"]) for m in messages])
    assert list(prompt.token_ids) == build_chat_input(specials, encode, messages)


def _forced(engine: ProcessEngine, token: str) -> SamplingParams:
    """Greedy with `token` pushed to the top: the model writes it at the first step."""
    token_id = engine._prompts.tokenizer.convert_tokens_to_ids(token)
    return SamplingParams(max_tokens=6, logit_bias=((token_id, 100.0),))


@pytest.mark.parametrize("role", ["<|user|>", "<|observation|>"])
def test_thudm_engine_chat_stops_at_the_next_role_tag(engine: ProcessEngine, role: str) -> None:
    [(tokens, finish)] = collect(engine, [chats(engine)[0]], _forced(engine, role))
    assert (tokens[-1:], finish) == ([engine._prompts.tokenizer.convert_tokens_to_ids(role)], "stop")
    assert len(tokens) == 1


def test_thudm_engine_base_model_runs_to_max_tokens_through_role_tags() -> None:
    base = create_engine(load_spec("tiny-glm4-base"))
    try:
        prompt = base.encode("The capital of France is")  # a completion: [gMASK] sop, then the text
        assert base.tokenizer.convert_ids_to_tokens(list(prompt.token_ids[:2])) == ["[gMASK]", "<sop>"]
        [(tokens, finish)] = collect(base, [prompt], _forced(base, "<|user|>"))
    finally:
        base.close()
    assert (len(tokens), finish) == (6, "length")


def test_thudm_engine_guide_style_offload_map_gives_the_same_tokens(tmp_path: Path) -> None:
    """A device_map in ChatGLM's names (the guides' `transformer.h.N`), half the layers offloaded to disk:
    translated to the native modules, it serves the tokens of one device."""
    guide = {
        "transformer.embedding": "disk",  # its weight is on `meta`: inputs go where its hook runs it
        "transformer.h.0": "cpu",
        "transformer.h.1": "disk",
        "transformer.encoder.final_layernorm": "cpu",
        "transformer.output_layer": "cpu",
    }
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    single = create_engine(load_spec("tiny-glm4"))
    try:
        expected = collect(single, chats(single)[:2], params)
    finally:
        single.close()
    split = create_engine(load_spec("tiny-glm4").model_copy(update={"device_map": guide}))
    try:
        assert split.info.parallel == "layers"
        assert collect(split, chats(split)[:2], params) == expected
    finally:
        split.close()
