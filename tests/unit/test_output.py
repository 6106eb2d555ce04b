"""Incremental detokenization and stop strings, with the real tiny tokenizer."""

from __future__ import annotations

import pytest

from shardbento.engine.base import SamplingParams
from shardbento.engine.output import IncrementalDetokenizer, OutputStream, StopMatcher


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from shardbento.tiny.models import ensure_generated

    return AutoTokenizer.from_pretrained(ensure_generated("tiny-llama"))


def test_output_stop_matcher_finds_stop_across_chunks() -> None:
    matcher = StopMatcher(["END"])
    emitted = []
    for chunk in ["hello E", "N", "D tail"]:
        text, stopped = matcher.push(chunk)
        emitted.append(text)
        if stopped:
            break
    assert "".join(emitted) == "hello "
    assert stopped


def test_output_stop_matcher_releases_false_prefix() -> None:
    matcher = StopMatcher(["ENDX"])
    first, _ = matcher.push("abc EN")
    second, stopped = matcher.push("Dy")
    assert not stopped
    assert first + second + matcher.flush() == "abc ENDy"
    assert first == "abc "


def test_output_stop_matcher_earliest_stop_wins() -> None:
    text, stopped = StopMatcher(["b", "a"]).push("xxabc")
    assert (text, stopped) == ("xx", True)


def test_output_detokenizer_never_splits_multibyte(tokenizer) -> None:
    text = "héllo wörld 🍱 ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == tokenizer.decode(ids)
    assert all("\ufffd" not in d for d in deltas)
    # the emoji is several byte tokens: some deltas must have been held back
    assert deltas.count("") > 0


def test_output_stream_eos_and_length(tokenizer) -> None:
    ids = tokenizer("one two three four", add_special_tokens=False)["input_ids"]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    stream = OutputStream(tokenizer, (), SamplingParams(max_tokens=50), {eos})
    deltas = [stream.push(i) for i in [*ids, eos]]
    assert deltas[-1].finish_reason == "stop"
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert "".join(d.text for d in deltas) == tokenizer.decode(ids)

    short = OutputStream(tokenizer, (), SamplingParams(max_tokens=2), {eos})
    assert short.push(ids[0]).finish_reason is None
    assert short.push(ids[1]).finish_reason == "length"


def test_output_stream_ignore_eos_and_min_tokens(tokenizer) -> None:
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ignoring = OutputStream(tokenizer, (), SamplingParams(max_tokens=3, ignore_eos=True), {eos})
    assert [ignoring.push(eos).finish_reason for _ in range(3)] == [None, None, "length"]
    early = OutputStream(tokenizer, (), SamplingParams(max_tokens=9, min_tokens=2), {eos})
    assert [early.push(eos).finish_reason for _ in range(3)] == [None, None, "stop"]


def _byte_level_ids(tokenizer) -> list[int]:
    """The single-byte tokens of a byte-level BPE, in byte order."""
    from shardbento.thudm.tiktoken_model import byte_alphabet

    return tokenizer.convert_tokens_to_ids([byte_alphabet()[byte] for byte in range(256)])


def _tokenizers():
    """Every kind of tokenizer a stream decodes with: byte-level BPE (tiny-llama, GLM-4's conversion),
    SentencePiece with byte fallback (ChatGLM3's class, and the plain fast tokenizer vLLM loads)."""
    from transformers import AutoTokenizer

    from shardbento.engine.hf.chatglm3_tokenizer import load_converted
    from shardbento.thudm.convert import native_tokenizer
    from shardbento.tiny.models import ensure_generated

    llama = AutoTokenizer.from_pretrained(ensure_generated("tiny-llama"))
    glm4 = AutoTokenizer.from_pretrained(native_tokenizer(ensure_generated("tiny-glm4")))
    chatglm3 = native_tokenizer(ensure_generated("tiny-chatglm3"))
    sentencepiece_bytes = [f"<0x{byte:02X}>" for byte in range(256)]
    for name, tokenizer in (
        ("tiny-llama", llama),
        ("glm4", glm4),
        ("chatglm3", load_converted(str(chatglm3))),
        ("chatglm3-plain", AutoTokenizer.from_pretrained(chatglm3)),
    ):
        byte_ids = (
            tokenizer.convert_tokens_to_ids(sentencepiece_bytes)
            if name.startswith("chatglm3")
            else _byte_level_ids(tokenizer)
        )
        yield name, tokenizer, byte_ids


@pytest.mark.parametrize("name", ["tiny-llama", "glm4", "chatglm3", "chatglm3-plain"])
def test_output_detokenizer_stream_joins_to_the_whole_decode(name: str) -> None:
    """Seeded outputs with byte runs that are valid UTF-8, cut short or invalid: the deltas joined are the
    decode of the whole output, for every kind of tokenizer (invalid runs included)."""
    import random

    from text_fuzz import random_ids

    _, tokenizer, byte_ids = next(entry for entry in _tokenizers() if entry[0] == name)
    byte_set = set(byte_ids)
    normal = [i for i in range(len(tokenizer)) if i not in byte_set and i not in tokenizer.all_special_ids]
    for ids in random_ids(random.Random(7), 400, normal, byte_ids, tokenizer.all_special_ids):
        detok = IncrementalDetokenizer(tokenizer)
        streamed = "".join(detok.push(token_id) for token_id in ids) + detok.flush()
        assert streamed == tokenizer.decode(ids, skip_special_tokens=True), (name, ids)
