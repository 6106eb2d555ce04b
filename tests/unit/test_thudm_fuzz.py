"""The converted THUDM tokenizers against their reference libraries on seeded random and real-looking text:
ChatGLM3's against `sentencepiece`, GLM-4's against `tiktoken`, encoding and decoding."""

from __future__ import annotations

import random

import pytest
from text_fuzz import random_ids, random_texts, real_texts, without
from transformers import AutoTokenizer

from shardbento.engine.hf.chatglm3_tokenizer import load_converted
from shardbento.thudm.convert import native_tokenizer
from shardbento.thudm.tokenizer import CHATGLM3_SPECIALS, GLM4_PATTERN, GLM4_SPECIALS, read_tiktoken
from shardbento.tiny.models import ensure_generated

sentencepiece = pytest.importorskip("sentencepiece")
tiktoken = pytest.importorskip("tiktoken")

NUM_RANDOM, NUM_REAL, NUM_ID_SEQUENCES = 10_000, 1_000, 10_000


def texts(seed: int, specials: tuple[str, ...]) -> list[str]:
    rng = random.Random(seed)
    return without([*random_texts(rng, NUM_RANDOM), *real_texts(rng, NUM_REAL)], specials)


def assert_same(what: str, inputs: list, ours: list, reference: list, library: str) -> None:
    """Every input's result equal; a failure names the first input that differs and both results."""
    differ = [
        (item, mine, theirs)
        for item, mine, theirs in zip(inputs, ours, reference, strict=True)
        if mine != theirs
    ]
    if differ:
        item, mine, theirs = differ[0]
        pytest.fail(
            f"{what}: {len(differ)} of {len(inputs)} differ; first {item!r}: ours {mine!r}, {library} {theirs!r}"
        )


@pytest.fixture(scope="module")
def chatglm3() -> tuple[object, object, object]:
    source = ensure_generated("tiny-chatglm3")
    converted = native_tokenizer(source)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    return load_converted(str(converted)), AutoTokenizer.from_pretrained(converted), reference


def test_thudm_fuzz_chatglm3_encodes_as_sentencepiece(chatglm3) -> None:
    fast, _, reference = chatglm3
    drawn = texts(28, (*CHATGLM3_SPECIALS, "</s>", "<unk>"))
    ours = fast(drawn, add_special_tokens=False)["input_ids"]
    assert_same("encode", drawn, ours, reference.encode(drawn), "sentencepiece")


def test_thudm_fuzz_chatglm3_decodes_encodings_as_sentencepiece(chatglm3) -> None:
    """The text back from every encoding, by our class and by the plain fast tokenizer's own decoder
    (what a plain AutoTokenizer decodes with): both SentencePiece's."""
    fast, plain, reference = chatglm3
    encoded = reference.encode(texts(29, (*CHATGLM3_SPECIALS, "</s>", "<unk>")))
    expected = reference.decode(encoded)
    assert_same("decode", encoded, fast.batch_decode(encoded), expected, "sentencepiece")
    assert_same("plain decode", encoded, plain.batch_decode(encoded), expected, "sentencepiece")


def original_decode(reference: object, ids: list[int], specials: dict[int, str]) -> str:
    """ChatGLM3's SPTokenizer.decode: SentencePiece on each run of its ids, a special's text between runs."""
    text, run = [], []
    for token_id in ids:
        if token_id in specials:
            text += [reference.decode(run), specials[token_id]]
            run = []
        else:
            run.append(token_id)
    return "".join([*text, reference.decode(run)])


def test_thudm_fuzz_chatglm3_decodes_random_ids_as_the_original(chatglm3) -> None:
    """Random ids, invalid byte runs among them: SentencePiece's text (one U+FFFD per invalid byte, valid
    characters kept, control pieces invisible, <unk> as " ⁇ "), specials between runs as the original."""
    fast, _, reference = chatglm3
    num_pieces = reference.vocab_size()
    byte_ids = [reference.piece_to_id(f"<0x{byte:02X}>") for byte in range(256)]
    specials = {num_pieces + index: token for index, token in enumerate(CHATGLM3_SPECIALS)}
    other = [i for i in range(num_pieces) if reference.is_control(i) or reference.is_unknown(i)]
    normal = [i for i in range(num_pieces) if i not in other and not reference.is_byte(i)]
    sequences = random_ids(random.Random(30), NUM_ID_SEQUENCES, normal, byte_ids, [*other, *specials])
    expected = [original_decode(reference, ids, specials) for ids in sequences]
    assert_same("decode", sequences, [fast.decode(ids) for ids in sequences], expected, "sentencepiece")


@pytest.fixture(scope="module")
def glm4() -> tuple[object, object]:
    source = ensure_generated("tiny-glm4")
    ranks = read_tiktoken(source / "tokenizer.model")
    specials = {token: len(ranks) + index for index, token in enumerate(GLM4_SPECIALS)}
    encoding = tiktoken.Encoding(
        name="tiny-glm4", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )
    return AutoTokenizer.from_pretrained(native_tokenizer(source)), encoding


def test_thudm_fuzz_glm4_encodes_as_tiktoken(glm4) -> None:
    fast, reference = glm4
    drawn = texts(31, GLM4_SPECIALS)
    ours = fast(drawn, add_special_tokens=False)["input_ids"]
    assert_same("encode", drawn, ours, reference.encode_ordinary_batch(drawn), "tiktoken")


def test_thudm_fuzz_glm4_decodes_as_tiktoken(glm4) -> None:
    """Every encoding back to its text, and random ids with runs of single-byte tokens that are not UTF-8."""
    fast, reference = glm4
    encoded = reference.encode_ordinary_batch(texts(32, GLM4_SPECIALS))
    assert_same("decode", encoded, fast.batch_decode(encoded), reference.decode_batch(encoded), "tiktoken")
    single_bytes = sorted(range(256), key=lambda rank: reference.decode_single_token_bytes(rank))
    normal = list(range(256, reference.n_vocab - len(GLM4_SPECIALS)))
    other = list(range(reference.n_vocab - len(GLM4_SPECIALS), reference.n_vocab))
    sequences = random_ids(random.Random(33), NUM_ID_SEQUENCES, normal, single_bytes, other)
    assert_same(
        "decode", sequences, fast.batch_decode(sequences), reference.decode_batch(sequences), "tiktoken"
    )


def test_thudm_fuzz_texts_cover_what_they_claim() -> None:
    """The drawn texts hold what the comparison is about (so a narrower generator cannot pass unnoticed)."""
    drawn = texts(28, CHATGLM3_SPECIALS)
    joined = "".join(drawn)
    for needle in (
        "    ",
        "\t\t",
        "\n\n",
        "  ",
        "你好",
        "😀",
        "👨‍👩‍👧",
        "\x00",
        "\u3000",
        "def ",
        "| name",
        '"nested"',
    ):
        assert needle in joined, needle
    assert sum(text.startswith(" ") for text in drawn) > 500
    assert len(drawn) == NUM_RANDOM + NUM_REAL
