"""THUDM tokenizers converted without remote code, checked against the sentencepiece and tiktoken libraries."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml
from thudm_reference import build_chat_input, tiktoken_reference
from transformers import AutoTokenizer

from shardbento.catalog import CATALOG_DIR
from shardbento.engine.hf.chatglm3_tokenizer import ConvertedChatGLM3Tokenizer, load_converted
from shardbento.thudm.convert import native_tokenizer
from shardbento.thudm.tokenizer import (
    CHATGLM3_SPECIALS,
    CHATGLM3_TOKENIZER_CLASS,
    TokenizerFormatError,
    build_fast_tokenizer,
    detect_format,
    read_sentencepiece,
    read_tiktoken,
)
from shardbento.tiny.models import ensure_generated
from shardbento.tiny.thudm_tokenizer import bilingual_lines, code_lines

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
    "def add(a, b):\n    return",  # the examples: whitespace runs are SentencePiece's "▁▁▁▁" pieces
    "a  b",
    "\t\tif (x) {\n\t\t\treturn;  // two  spaces",
]
CODE = (
    'def add(a, b):\n    """Sum."""\n    if a:\n        return a + b\n\treturn  b\n'  # spaces, tabs, newlines
)
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. 你是一个助手。"},
    {"role": "user", "content": "你好, who are you?"},
    {"role": "assistant", "content": "I am a tiny model."},
    {"role": "user", "content": "Tell me  a story\nin two lines."},
]


def corpus() -> list[str]:
    return [*list(bilingual_lines())[:300], *list(code_lines())[:100], *EDGE_TEXTS]


@pytest.fixture(scope="module")
def chatglm3() -> tuple[Path, object]:
    """The converted tokenizer as the engines load it (ConvertedChatGLM3Tokenizer)."""
    source = ensure_generated("tiny-chatglm3")
    return source, load_converted(str(native_tokenizer(source)))


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


def test_thudm_tokenizer_tiktoken_encodes_and_decodes_as_the_library(glm4) -> None:
    source, fast = glm4
    reference, _ = tiktoken_reference(source)
    for text in corpus():
        ids = fast.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text, disallowed_special=()), text
        assert fast.decode(ids) == reference.decode(ids), text


@pytest.mark.parametrize(
    "messages",
    [
        MESSAGES,
        [{"role": "user", "content": f"Fix this:\n{CODE}"}, {"role": "assistant", "content": CODE}],
        [{"role": "user", "content": "  indented first line"}, {"role": "assistant", "content": ""}],
    ],
    ids=["chat", "indented-code", "leading-space-and-empty"],
)
def test_thudm_tokenizer_chatglm3_chat_template_builds_the_original_ids(chatglm3, messages) -> None:
    source, fast = chatglm3
    reference = sentencepiece.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    specials = {token: reference.vocab_size() + i for i, token in enumerate(CHATGLM3_SPECIALS)}
    expected = build_chat_input(specials, reference.encode, messages)
    assert fast.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == expected


def test_thudm_tokenizer_glm4_chat_template_builds_the_original_ids(glm4) -> None:
    source, fast = glm4
    reference, specials = tiktoken_reference(source)
    expected = build_chat_input(
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


def test_thudm_tokenizer_chatglm3_decodes_invalid_bytes_as_sentencepiece(chatglm3) -> None:
    """A byte run that is not UTF-8 reads one character at a time, as SentencePiece reads it: the valid
    "u" kept, the stray continuation byte one U+FFFD (a `tokenizers` ByteFallback gives two)."""
    source, fast = chatglm3
    reference = sentencepiece.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    ids = [reference.piece_to_id(piece) for piece in ("<0x75>", "<0x87>", "<0xE4>", "<0xBD>", "<0xA0>")]
    assert fast.decode(ids) == reference.decode(ids) == "u\ufffd你"
    assert fast.decode(ids[:4]) == reference.decode(ids[:4]) == "u\ufffd\ufffd\ufffd"
    plain = AutoTokenizer.from_pretrained(native_tokenizer(source))
    assert plain.decode(ids[:2]) == "\ufffd\ufffd"  # why the class exists


def test_thudm_tokenizer_converted_class_is_the_one_the_config_names(chatglm3) -> None:
    _, fast = chatglm3
    assert type(fast).__name__ == CHATGLM3_TOKENIZER_CLASS == ConvertedChatGLM3Tokenizer.__name__
    glm4_dir = native_tokenizer(ensure_generated("tiny-glm4"))
    assert load_converted(str(glm4_dir)) is None


def _train_sentencepiece(path: Path, **options) -> None:
    trained = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(bilingual_lines(200))),
        model_writer=trained,
        vocab_size=1000,
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
        **options,
    )
    (path / "tokenizer.model").write_bytes(trained.getvalue())


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"model_type": "unigram"}, "model type unigram"),
        ({"model_type": "bpe", "normalization_rule_name": "nmt_nfkc"}, "normalization rule 'nmt_nfkc'"),
        ({"model_type": "bpe", "user_defined_symbols": ["<tool>"]}, "user-defined"),
    ],
)
def test_thudm_tokenizer_refuses_sentencepiece_options_it_would_not_reproduce(
    tmp_path: Path, options: dict, reason: str
) -> None:
    _train_sentencepiece(tmp_path, **options)
    with pytest.raises(TokenizerFormatError, match=reason):
        build_fast_tokenizer(tmp_path, tmp_path / "out", 128)


def test_thudm_tokenizer_converts_other_whitespace_options_exactly(tmp_path: Path) -> None:
    """No dummy prefix, or SentencePiece's default of squeezing whitespace: still token for token."""
    texts = [*corpus()[-40:], "  lead and trail  ", "a   b\t c", " ", ""]
    for index, options in enumerate(
        [{"add_dummy_prefix": False}, {"remove_extra_whitespaces": True, "add_dummy_prefix": True}]
    ):
        model_dir = tmp_path / str(index)
        model_dir.mkdir()
        _train_sentencepiece(model_dir, model_type="bpe", normalization_rule_name="identity", **options)
        build_fast_tokenizer(model_dir, model_dir / "out", 128)
        fast = load_converted(str(model_dir / "out"))
        reference = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
        assert fast(texts, add_special_tokens=False)["input_ids"] == reference.encode(texts), options
        encoded = reference.encode(texts)
        assert fast.batch_decode(encoded) == reference.decode(encoded), options


def test_thudm_tokenizer_a_new_converter_version_is_a_new_cache_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conversion cached by an older converter is not reused; the other format's cache is kept."""
    from shardbento.thudm import convert

    chatglm3, glm4 = ensure_generated("tiny-chatglm3"), ensure_generated("tiny-glm4")
    monkeypatch.setenv("SHARDBENTO_CACHE", str(tmp_path))
    before = native_tokenizer(chatglm3), native_tokenizer(glm4)
    monkeypatch.setitem(
        convert.TOKENIZER_VERSIONS, "sentencepiece", convert.TOKENIZER_VERSIONS["sentencepiece"] + 1
    )
    assert native_tokenizer(chatglm3) != before[0]
    assert native_tokenizer(glm4) == before[1]
