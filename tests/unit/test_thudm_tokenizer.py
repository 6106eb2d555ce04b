"""THUDM tokenizers converted without remote code, checked against the sentencepiece and tiktoken libraries."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from shardbento.catalog import CATALOG_DIR
from shardbento.thudm.convert import native_tokenizer
from shardbento.thudm.tokenizer import (
    CHATGLM3_SPECIALS,
    GLM4_PATTERN,
    GLM4_SPECIALS,
    TokenizerFormatError,
    detect_format,
    read_sentencepiece,
    read_tiktoken,
)
from shardbento.tiny.models import ensure_generated
from shardbento.tiny.thudm_tokenizer import bilingual_lines

sentencepiece = pytest.importorskip("sentencepiece")
tiktoken = pytest.importorskip("tiktoken")

EDGE_TEXTS = [
    "",
    " ",
    "    print('indented')",
    "  two  spaces\n\nnew lines\t tab 12345 ",
    "混合 English 和中文，数字 2048。",
    "\n 你好",
    "emoji 😀 and a rare 龘 character",
    "philosophy of the desktop",
    "trailing space ",
]
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. 你是一个助手。"},
    {"role": "user", "content": "你好, who are you?"},
    {"role": "assistant", "content": "I am a tiny model."},
    {"role": "user", "content": "Tell me  a story\nin two lines."},
]


def corpus() -> list[str]:
    return [*list(bilingual_lines())[:300], *EDGE_TEXTS]


@pytest.fixture(scope="module")
def chatglm3() -> tuple[Path, object]:
    source = ensure_generated("tiny-chatglm3")
    return source, AutoTokenizer.from_pretrained(native_tokenizer(source))


@pytest.fixture(scope="module")
def glm4() -> tuple[Path, object]:
    source = ensure_generated("tiny-glm4")
    return source, AutoTokenizer.from_pretrained(native_tokenizer(source))


def test_thudm_tokenizer_sentencepiece_encodes_and_decodes_as_the_library(chatglm3) -> None:
    source, fast = chatglm3
    reference = sentencepiece.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    for text in corpus():
        ids = fast.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text), text
        assert fast.decode(ids) == reference.decode(ids), text


def tiktoken_reference(source: Path) -> tuple[object, dict[str, int]]:
    """tiktoken itself over the checkpoint's ranks, with GLM-4's pattern and specials."""
    ranks = read_tiktoken(source / "tokenizer.model")
    specials = {token: len(ranks) + index for index, token in enumerate(GLM4_SPECIALS)}
    encoding = tiktoken.Encoding(
        name="tiny-glm4", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )
    return encoding, specials


def test_thudm_tokenizer_tiktoken_encodes_and_decodes_as_the_library(glm4) -> None:
    source, fast = glm4
    reference, _ = tiktoken_reference(source)
    for text in corpus():
        ids = fast.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text, disallowed_special=()), text
        assert fast.decode(ids) == reference.decode(ids), text


def _build_chat_input(specials: dict[str, int], encode, messages: list[dict]) -> list[int]:
    """What the original tokenizers' build_chat_input assembles: [gMASK] sop, then per message the role
    tag, encode(metadata + "\\n"), encode(content); then <|assistant|>."""
    ids = [specials["[gMASK]"], specials["sop"] if "sop" in specials else specials["<sop>"]]
    for message in messages:
        ids += [specials[f"<|{message['role']}|>"], *encode("\n"), *encode(message["content"])]
    return [*ids, specials["<|assistant|>"]]


def test_thudm_tokenizer_chatglm3_chat_template_builds_the_original_ids(chatglm3) -> None:
    source, fast = chatglm3
    reference = sentencepiece.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    specials = {token: reference.vocab_size() + i for i, token in enumerate(CHATGLM3_SPECIALS)}
    expected = _build_chat_input(specials, reference.encode, MESSAGES)
    assert fast.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False) == expected


def test_thudm_tokenizer_glm4_chat_template_builds_the_original_ids(glm4) -> None:
    source, fast = glm4
    reference, specials = tiktoken_reference(source)
    expected = _build_chat_input(
        specials, lambda text: reference.encode(text, disallowed_special=()), MESSAGES
    )
    assert fast.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False) == expected


def test_thudm_tokenizer_plain_encoding_starts_with_gmask_sop(chatglm3, glm4) -> None:
    for (_, fast), sop in ((chatglm3, "sop"), (glm4, "<sop>")):
        ids = fast.encode("hello")
        assert fast.convert_ids_to_tokens(ids[:2]) == ["[gMASK]", sop]
        assert ids[2:] == fast.encode("hello", add_special_tokens=False)


def test_thudm_tokenizer_bare_word_specials_match_only_whole_words(chatglm3) -> None:
    _, fast = chatglm3
    sop = fast.convert_tokens_to_ids("sop")
    assert sop not in fast.encode("philosophy of the desktop", add_special_tokens=False)


def test_thudm_tokenizer_detects_the_format_and_refuses_garbage(tmp_path: Path) -> None:
    assert detect_format(ensure_generated("tiny-chatglm3")) == "sentencepiece"
    assert detect_format(ensure_generated("tiny-glm4")) == "tiktoken"
    assert detect_format(tmp_path) is None
    (tmp_path / "tokenizer.model").write_text("dG9r 0\ndG9r x\n")
    with pytest.raises(TokenizerFormatError, match="tokenizer.model:2"):
        read_tiktoken(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.model").write_bytes(b"\x0f\x00")
    with pytest.raises(TokenizerFormatError):
        read_sentencepiece(tmp_path / "tokenizer.model")


@pytest.mark.parametrize("name", ["tiny-chatglm3"])
def test_thudm_tokenizer_catalog_eos_ids_are_the_role_tags(name: str, chatglm3) -> None:
    _, fast = chatglm3
    entry = yaml.safe_load((CATALOG_DIR / f"{name}.yaml").read_text())
    assert entry["eos_token_ids"] == fast.convert_tokens_to_ids(["<|user|>", "<|observation|>"])
