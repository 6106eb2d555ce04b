"""THUDM tokenizers without their remote code: ChatGLM3's SentencePiece model and GLM-4's tiktoken ranks,
read from `tokenizer.model` and rebuilt as fast tokenizers with their special tokens and chat formats."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

TokenizerFormat = Literal["sentencepiece", "tiktoken"]

# Both formats number their special tokens after the vocabulary, in this order (tokenization_chatglm.py).
CHATGLM3_SPECIALS = (
    "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
)  # fmt: skip
GLM4_SPECIALS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
    "<|end_of_video|>",
)  # fmt: skip
# GLM-4's split pattern (cl100k's, with a greedy letters run and digits in threes).
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ROLE_TAGS = ("<|user|>", "<|observation|>")  # a chat turn ends where the model starts the next role

# Each message is "<|role|>{metadata}\n" then its content, the turn prefix once, "<|assistant|>" to answer:
# what build_chat_input assembles. ChatGLM3's SentencePiece adds a dummy "▁" to each piece it encodes, so
# the content follows " ". Tools go into the system message as the original chat() puts them there.
_CHATGLM3_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop{% endif %}"
    "{% set role = 'observation' if message['role'] == 'tool' else message['role'] %}"
    "{% set content = message['content'] if message['content'] is string else '' %}"
    "{% if loop.first and tools and role == 'system' %}"
    "{% set content = content + '\\n' + (tools | tojson(indent=4)) %}{% endif %}"
    "{% if loop.first and tools and role != 'system' %}"
    "<|system|>\n {{ tools | tojson(indent=4) }}{% endif %}"
    "<|{{ role }}|>{{ message.get('metadata', '') }}\n {{ content }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_GLM4_TEMPLATE = (
    "[gMASK]<sop>{% if tools %}<|system|>\n"
    "{% for tool in tools %}{% set function = tool['function'] if tool['function'] is defined else tool %}"
    "\n\n## {{ function['name'] }}\n\n{{ function | tojson(indent=4) }}"
    "\n在调用上述函数时，请使用 Json 格式表示调用的参数。{% endfor %}{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'observation' if message['role'] == 'tool' else message['role'] %}"
    "<|{{ role }}|>{{ message.get('metadata', '') }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|begin_of_image|><|endoftext|><|end_of_image|>{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class TokenizerFormatError(ValueError):
    """tokenizer.model is not what its format promises, or uses an option the conversion does not reproduce."""


def detect_format(model_dir: Path) -> TokenizerFormat | None:
    """SentencePiece (a protobuf) or tiktoken (base64 token, space, rank per line); None if there is no file."""
    path = model_dir / "tokenizer.model"
    if not path.is_file():
        return None
    with open(path, "rb") as file:
        head = file.read(256).split(b"\n", 1)[0].split(b" ")
    if len(head) == 2 and head[1].isdigit():
        return "tiktoken"
    return "sentencepiece"


def build_fast_tokenizer(model_dir: Path, out_dir: Path, max_length: int) -> Any:
    """Convert `model_dir/tokenizer.model` to a PreTrainedTokenizerFast and save it into `out_dir`."""
    from transformers import PreTrainedTokenizerFast

    kind = detect_format(model_dir)
    if kind is None:
        raise TokenizerFormatError(f"{model_dir} has no tokenizer.model")
    model_file = model_dir / "tokenizer.model"
    if kind == "sentencepiece":
        backend, specials, template = sentencepiece_backend(model_file), CHATGLM3_SPECIALS, _CHATGLM3_TEMPLATE
        named = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    else:
        backend, specials, template = tiktoken_backend(model_file), GLM4_SPECIALS, _GLM4_TEMPLATE
        named = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        chat_template=template,
        extra_special_tokens=list(specials),
        **named,
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _prefix_processor(specials: tuple[str, ...], first: str, second: str, base: int) -> Any:
    """`[gMASK] sop` before every encoded text, as build_inputs_with_special_tokens puts them."""
    from tokenizers import processors

    ids = {token: base + index for index, token in enumerate(specials)}
    return processors.TemplateProcessing(
        single=f"{first} {second} $A",
        pair=f"{first} {second} $A $B",
        special_tokens=[(first, ids[first]), (second, ids[second])],
    )


def _added_specials(tokenizer: Any, specials: tuple[str, ...], word_like: frozenset[str]) -> None:
    """Register the specials with consecutive ids after the vocabulary; a bare word ("sop") matches only
    as a whole word, so "philosophy" keeps its letters."""
    from tokenizers import AddedToken

    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, single_word=t in word_like) for t in specials]
    )


# --- SentencePiece: a minimal reader of the protobuf fields the conversion needs -----------------------


@dataclass(frozen=True, slots=True)
class SentencePieceModel:
    pieces: tuple[tuple[str, float, int], ...]  # piece, score, type (1 normal, 2 unknown, 3 control, 6 byte)
    model_type: int  # 1 unigram, 2 BPE
    byte_fallback: bool
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    precompiled_charsmap: bytes


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, Any]]:
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos : pos + size], pos + size
        else:
            raise TokenizerFormatError(f"tokenizer.model: unsupported protobuf wire type {wire}")
        yield field, value


def read_sentencepiece(path: Path) -> SentencePieceModel:
    pieces: list[tuple[str, float, int]] = []
    trainer: dict[int, Any] = {}
    normalizer: dict[int, Any] = {}
    for field, value in _fields(path.read_bytes()):
        if field == 1:
            entry = dict(_fields(value))
            score = struct.unpack("<f", entry[2])[0] if 2 in entry else 0.0
            pieces.append((entry[1].decode("utf-8"), score, entry.get(3, 1)))
        elif field == 2:
            trainer = dict(_fields(value))
        elif field == 3:
            normalizer = dict(_fields(value))
    if not pieces:
        raise TokenizerFormatError(f"{path}: no pieces (not a SentencePiece model)")
    return SentencePieceModel(
        pieces=tuple(pieces),
        model_type=trainer.get(3, 1),
        byte_fallback=bool(trainer.get(35, 0)),
        add_dummy_prefix=bool(normalizer.get(3, 1)),
        remove_extra_whitespaces=bool(normalizer.get(4, 1)),
        precompiled_charsmap=normalizer.get(2, b""),
    )


def sentencepiece_backend(path: Path) -> Any:
    """The SentencePiece model as a `tokenizers` pipeline: its normalizer, "▁" for spaces (one dummy
    prefix per encoded text), BPE merges ranked by the merged piece's score, byte fallback."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram

    model = read_sentencepiece(path)
    unk = next((i for i, (_, _, kind) in enumerate(model.pieces) if kind == 2), 0)
    if model.model_type == 2:
        vocab = {piece: index for index, (piece, _, _) in enumerate(model.pieces)}
        backend = Tokenizer(
            BPE(vocab, _sentencepiece_merges(model, vocab), unk_token=model.pieces[unk][0], fuse_unk=True,
                byte_fallback=model.byte_fallback)
        )  # fmt: skip
    elif model.model_type == 1:
        scores = [(piece, score) for piece, score, _ in model.pieces]
        backend = Tokenizer(Unigram(scores, unk_id=unk, byte_fallback=model.byte_fallback))
    else:
        raise TokenizerFormatError(
            f"{path}: SentencePiece model type {model.model_type} is not BPE or unigram"
        )
    steps = [normalizers.Precompiled(model.precompiled_charsmap)] if model.precompiled_charsmap else []
    if model.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex("^ | $"), "")]
    # SentencePiece prefixes "▁" even to a text that starts with a space (Metaspace's own prepend does not).
    if model.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if model.add_dummy_prefix:
        decode.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(decode)
    _added_specials(backend, CHATGLM3_SPECIALS, frozenset({"sop", "eop"}))
    backend.post_processor = _prefix_processor(CHATGLM3_SPECIALS, "[gMASK]", "sop", len(model.pieces))
    return backend


def _sentencepiece_merges(model: SentencePieceModel, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two known pieces, the higher-scored merged piece first (how
    SentencePiece's BPE chooses its next merge)."""
    ranked: list[tuple[float, int, int, tuple[str, str]]] = []
    for index, (piece, score, kind) in enumerate(model.pieces):
        if kind != 1 or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, index, vocab[left], (left, right)))
    ranked.sort()
    return [pair for _, _, _, pair in ranked]


# --- tiktoken: base64 token and rank per line -----------------------------------------------------------


def read_tiktoken(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError:
            raise TokenizerFormatError(f"{path}:{number}: not '<base64 token> <rank>'") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerFormatError(f"{path}: ranks are not 0..{len(ranks) - 1}")
    return ranks


def tiktoken_backend(path: Path) -> Any:
    """tiktoken's ranks as a byte-level BPE: each token's merge is the pair its own bytes reduce to under
    the lower ranks; a pre-split piece that is itself a token is kept whole, as tiktoken does."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    ranks = read_tiktoken(path)
    to_text = byte_alphabet()
    vocab = {"".join(to_text[b] for b in token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _reduce(token, ranks, rank)
        if len(parts) != 2:
            raise TokenizerFormatError(
                f"{path}: token of rank {rank} is not a merge of two lower-ranked tokens"
            )
        merges.append(tuple("".join(to_text[b] for b in part) for part in parts))
    backend = Tokenizer(BPE(vocab, merges, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    _added_specials(backend, GLM4_SPECIALS, frozenset())
    backend.post_processor = _prefix_processor(GLM4_SPECIALS, "[gMASK]", "<sop>", len(ranks))
    return backend


def _reduce(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """tiktoken's byte-pair merge of `token`, using only ranks below `below`."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, at = below, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], below)
            if rank < best:
                best, at = rank, i
        if at < 0:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts


def byte_alphabet() -> dict[int, str]:
    """The byte-level alphabet: printable bytes stand for themselves, the rest map past U+0100."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table
