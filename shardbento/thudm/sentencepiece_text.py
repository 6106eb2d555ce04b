"""SentencePiece's decoding, piece for piece: a run of byte pieces read one UTF-8 character at a time (each
invalid byte one U+FFFD, the valid characters around it kept), control pieces invisible, <unk> shown as its
surface, the dummy prefix's space dropped once at the start; and ChatGLM3's specials between such runs, as its
SPTokenizer.decode puts them. Decoders in `tokenizers` see one token at a time, so this is plain Python."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")
_REPLACEMENT = "\ufffd"
_SPACE = "\u2581"


@dataclass(frozen=True, slots=True)
class PieceDecoding:
    """What decoding needs to know beyond the pieces' text (saved in tokenizer_config.json)."""

    num_pieces: int  # ids below are SentencePiece's own pieces; the specials follow
    controls: frozenset[str]
    unknown: str
    unk_surface: str
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "num_pieces": self.num_pieces,
            "controls": sorted(self.controls),
            "unknown": self.unknown,
            "unk_surface": self.unk_surface,
            "add_dummy_prefix": self.add_dummy_prefix,
            "remove_extra_whitespaces": self.remove_extra_whitespaces,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PieceDecoding:
        return cls(**{**data, "controls": frozenset(data["controls"])})


def decode_tokens(
    tokens: Sequence[str | None], ids: Sequence[int], decoding: PieceDecoding, skipped: set[int]
) -> str:
    """ChatGLM3's SPTokenizer.decode: each run of SentencePiece pieces decoded on its own, a special's text
    between runs. A skipped id keeps its place with no text (a special still ends the run before it)."""
    text, run = [], []
    for token, token_id in zip(tokens, ids, strict=True):
        if token_id < decoding.num_pieces:
            run.append("" if token_id in skipped else token)
            continue
        text.append(decode_pieces(run, decoding))
        run = []
        if token_id not in skipped and token is not None:  # None: an id past the vocabulary (padding)
            text.append(token)
    text.append(decode_pieces(run, decoding))
    return "".join(text)


def decode_pieces(pieces: Sequence[str], decoding: PieceDecoding) -> str:
    """One SentencePiece decode: an empty piece stands for a skipped control (no text, no change)."""
    text: list[str] = []
    pending = bytearray()
    at_start, stripped = True, False  # expecting the dummy prefix's space; the last piece dropped one
    for piece in pieces:
        byte = _BYTE_PIECE.fullmatch(piece)
        if byte:
            pending.append(int(byte.group(1), 16))
            continue
        if pending:
            text.append(utf8_text(bytes(pending)))
            pending.clear()
        if stripped or any(text):
            at_start = False
        surface, stripped = _surface(piece, decoding, at_start)
        text.append(surface)
    if pending:
        text.append(utf8_text(bytes(pending)))
    return "".join(text)


def _surface(piece: str, decoding: PieceDecoding, at_start: bool) -> tuple[str, bool]:
    if not piece or piece in decoding.controls:
        return "", False
    if piece == decoding.unknown:
        return decoding.unk_surface, False
    stripped = False
    if at_start and (decoding.add_dummy_prefix or decoding.remove_extra_whitespaces):
        if piece.startswith(_SPACE):
            piece, stripped = piece[1:], True
        # removing extra whitespace drops every leading space, so the next piece is still at the start
        stripped = stripped and not decoding.remove_extra_whitespaces
    return piece.replace(_SPACE, " "), stripped


def utf8_text(data: bytes) -> str:
    """Bytes as SentencePiece decodes a byte run: character by character, one U+FFFD per byte that does
    not start a valid character (Python's "replace" gives one per maximal invalid prefix instead)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    text, pos = [], 0
    while pos < len(data):
        lead = data[pos]
        size = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4
        try:
            text.append(data[pos : pos + size].decode("utf-8"))
            pos += size
        except UnicodeDecodeError:
            text.append(_REPLACEMENT)
            pos += 1
    return "".join(text)
