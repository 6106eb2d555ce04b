"""THUDM tokenizers without their remote code: ChatGLM3's SentencePiece model and GLM-4's tiktoken ranks,
read from `tokenizer.model` and rebuilt as fast tokenizers with their special tokens and chat formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from shardbento.thudm.errors import TokenizerFormatError
from shardbento.thudm.sentencepiece_model import (
    CONTROL,
    UNKNOWN,
    check_reproducible,
    read_sentencepiece,
    sentencepiece_backend,
)
from shardbento.thudm.sentencepiece_text import PieceDecoding
from shardbento.thudm.tiktoken_model import GLM4_PATTERN, read_tiktoken, tiktoken_backend

__all__ = ["GLM4_PATTERN", "TokenizerFormatError", "read_sentencepiece", "read_tiktoken"]

TokenizerFormat = Literal["sentencepiece", "tiktoken"]
# The converted ChatGLM3 tokenizer's class in its tokenizer_config.json: a fast tokenizer with SentencePiece's
# decoding (shardbento/engine/hf/chatglm3_tokenizer.py loads it).
CHATGLM3_TOKENIZER_CLASS = "ConvertedChatGLM3Tokenizer"

# Both formats number their special tokens after the vocabulary, in this order (tokenization_chatglm.py).
CHATGLM3_SPECIALS = (
    "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
)  # fmt: skip
GLM4_SPECIALS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
    "<|end_of_video|>",
)  # fmt: skip
ROLE_TAGS = ("<|user|>", "<|observation|>")  # a chat turn ends where the model starts the next role

# Each message is "<|role|>{metadata}\n" then its content, the turn prefix once, "<|assistant|>" to answer:
# what build_chat_input assembles. ChatGLM3's SentencePiece adds a dummy "▁" to each piece it encodes, so
# non-empty content follows " " (empty content encodes to nothing); since no piece holds a newline (checked
# at conversion), "{metadata}\n {content}" gives encode(metadata + "\n") + encode(content). Tools go into the
# system message as the original chat() puts them there.
_CHATGLM3_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop{% endif %}"
    "{% set role = 'observation' if message['role'] == 'tool' else message['role'] %}"
    "{% set content = message['content'] if message['content'] is string else '' %}"
    "{% if loop.first and tools and role == 'system' %}"
    "{% set content = content + '\\n' + (tools | tojson(indent=4)) %}{% endif %}"
    "{% if loop.first and tools and role != 'system' %}"
    "<|system|>\n {{ tools | tojson(indent=4) }}{% endif %}"
    "<|{{ role }}|>{{ message.get('metadata', '') }}\n{% if content %} {{ content }}{% endif %}{% endfor %}"
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
    kind = detect_format(model_dir)
    if kind is None:
        raise TokenizerFormatError(f"{model_dir} has no tokenizer.model")
    if kind == "sentencepiece":
        return _build_chatglm3(model_dir / "tokenizer.model", out_dir, max_length)
    return _build_glm4(model_dir / "tokenizer.model", out_dir, max_length)


def _build_chatglm3(path: Path, out_dir: Path, max_length: int) -> Any:
    """The SentencePiece segmentation, the specials after the pieces, SentencePiece's decoding recorded for
    the tokenizer class that reproduces it (engine/hf/chatglm3_tokenizer.py; elsewhere it loads as a plain
    fast tokenizer whose decoder differs only on byte runs that are not UTF-8 and on control pieces)."""
    model = read_sentencepiece(path)
    check_reproducible(model, path)
    newline = next((piece for piece, _, _ in model.pieces if "\n" in piece), None)
    if newline is not None:
        raise TokenizerFormatError(
            f"{path}: piece {newline!r} holds a newline; the chat template's turns ('<|role|>\\n' then the "
            "content, encoded apart by the original) would merge across it"
        )
    backend = sentencepiece_backend(model)
    _added_specials(backend, CHATGLM3_SPECIALS, frozenset({"sop", "eop"}))
    backend.post_processor = _prefix_processor(CHATGLM3_SPECIALS, "[gMASK]", "sop", len(model.pieces))
    decoding = PieceDecoding(
        num_pieces=len(model.pieces),
        controls=frozenset(model.pieces_of(CONTROL)),
        unknown=next(iter(model.pieces_of(UNKNOWN)), ""),
        unk_surface=model.unk_surface,
        add_dummy_prefix=model.add_dummy_prefix,
        remove_extra_whitespaces=model.remove_extra_whitespaces,
    )
    named = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    return _save(backend, CHATGLM3_SPECIALS, _CHATGLM3_TEMPLATE, named, out_dir, max_length, decoding)


def _build_glm4(path: Path, out_dir: Path, max_length: int) -> Any:
    ranks = read_tiktoken(path)
    backend = tiktoken_backend(ranks, path)
    _added_specials(backend, GLM4_SPECIALS, frozenset())
    backend.post_processor = _prefix_processor(GLM4_SPECIALS, "[gMASK]", "<sop>", len(ranks))
    named = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    return _save(backend, GLM4_SPECIALS, _GLM4_TEMPLATE, named, out_dir, max_length)


def _save(
    backend: Any,
    specials: tuple[str, ...],
    template: str,
    named: dict[str, str],
    out_dir: Path,
    max_length: int,
    decoding: PieceDecoding | None = None,
) -> Any:
    """The PreTrainedTokenizerFast saved into `out_dir`; with SentencePiece's `decoding`, under the name of
    the class that decodes with it (AutoTokenizer still loads the plain fast tokenizer from it)."""
    from transformers import PreTrainedTokenizerFast

    extra = {"sentencepiece_decoding": decoding.as_dict()} if decoding else {}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        chat_template=template,
        extra_special_tokens=list(specials),
        **named,
        **extra,
    )
    tokenizer.save_pretrained(out_dir)
    if decoding:
        config_path = out_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["tokenizer_class"] = CHATGLM3_TOKENIZER_CLASS
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
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
