"""ChatGLM3's SentencePiece `tokenizer.model`: a minimal reader of its protobuf, and the same segmentation as a
`tokenizers` pipeline (normalizer, BPE over the whole text, byte fallback), refusing options it would not
reproduce token for token."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardbento.thudm.errors import TokenizerFormatError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
SPACE = "\u2581"  # "▁": SentencePiece's escaped space
DEFAULT_UNK_SURFACE = " \u2047 "  # " ⁇ ": what SentencePiece decodes <unk> to unless the model says otherwise


@dataclass(frozen=True, slots=True)
class SentencePieceModel:
    pieces: tuple[tuple[str, float, int], ...]  # piece, score, type (NORMAL, UNKNOWN, CONTROL, ..., BYTE)
    model_type: int  # UNIGRAM or BPE (word and char models are refused)
    byte_fallback: bool
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    escape_whitespaces: bool
    treat_whitespace_as_suffix: bool
    normalization: str  # the normalizer's rule name ("identity" is the only one reproduced)
    precompiled_charsmap: bytes
    denormalizer_charsmap: bytes
    unk_surface: str

    def pieces_of(self, kind: int) -> list[str]:
        return [piece for piece, _, piece_kind in self.pieces if piece_kind == kind]


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
    """The fields of ModelProto the conversion uses (field numbers from sentencepiece_model.proto)."""
    pieces: list[tuple[str, float, int]] = []
    trainer: dict[int, Any] = {}
    normalizer: dict[int, Any] = {}
    denormalizer: dict[int, Any] = {}
    try:
        for field, value in _fields(path.read_bytes()):
            if field == 1:
                entry = dict(_fields(value))
                score = struct.unpack("<f", entry[2])[0] if 2 in entry else 0.0
                pieces.append((entry[1].decode("utf-8"), score, entry.get(3, NORMAL)))
            elif field in (2, 3, 5):
                {2: trainer, 3: normalizer, 5: denormalizer}[field].update(_fields(value))
    except (IndexError, KeyError, TypeError, UnicodeDecodeError, struct.error) as exc:
        raise TokenizerFormatError(f"{path}: not a SentencePiece model ({exc!r})") from None
    if not pieces:
        raise TokenizerFormatError(f"{path}: no pieces (not a SentencePiece model)")
    return SentencePieceModel(
        pieces=tuple(pieces),
        model_type=trainer.get(3, UNIGRAM),
        byte_fallback=bool(trainer.get(35, 0)),
        add_dummy_prefix=bool(normalizer.get(3, 1)),
        remove_extra_whitespaces=bool(normalizer.get(4, 1)),
        escape_whitespaces=bool(normalizer.get(5, 1)),
        treat_whitespace_as_suffix=bool(trainer.get(24, 0)),
        normalization=normalizer.get(1, b"").decode("utf-8", "replace"),
        precompiled_charsmap=normalizer.get(2, b""),
        denormalizer_charsmap=denormalizer.get(2, b""),
        unk_surface=trainer[44].decode("utf-8") if 44 in trainer else DEFAULT_UNK_SURFACE,
    )


def check_reproducible(model: SentencePieceModel, path: Path) -> None:
    """Refuse what the `tokenizers` pipeline would segment differently from SentencePiece."""
    refusals = []
    if model.model_type != BPE:
        kind = {UNIGRAM: "unigram"}.get(model.model_type, f"type {model.model_type}")
        refusals.append(
            f"model type {kind}: only BPE (ChatGLM3's) is converted exactly; a unigram lattice's ties "
            "break differently in `tokenizers` (float64 path scores against SentencePiece's float32)"
        )
    if model.precompiled_charsmap or model.denormalizer_charsmap:
        refusals.append(f"normalization rule {model.normalization!r} (only 'identity' is reproduced)")
    if not model.escape_whitespaces or model.treat_whitespace_as_suffix:
        refusals.append("unescaped whitespace or whitespace as a suffix")
    odd = [piece for piece, _, kind in model.pieces if kind in (USER_DEFINED, UNUSED)]
    if odd:
        refusals.append(f"{len(odd)} user-defined or unused pieces (e.g. {odd[0]!r})")
    scores = [score for piece, score, kind in model.pieces if kind == NORMAL and len(piece) > 1]
    if len(set(scores)) != len(scores):
        refusals.append("two merged pieces share a score (BPE's merge order would be ambiguous)")
    if refusals:
        raise TokenizerFormatError(f"{path}: cannot convert SentencePiece exactly: {'; '.join(refusals)}")


def sentencepiece_backend(model: SentencePieceModel) -> Any:
    """The model as a `tokenizers` pipeline. SentencePiece's BPE runs over the whole normalized text (no
    pre-tokenizer: a run of spaces merges into "▁▁▁▁" as the vocabulary allows), merging the adjacent pair
    whose joined piece scores highest; every split of a piece into two pieces is a merge, ranked so."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE as BPEModel

    vocab = {piece: index for index, (piece, _, _) in enumerate(model.pieces)}
    unk = next((piece for piece, _, kind in model.pieces if kind == UNKNOWN), model.pieces[0][0])
    backend = Tokenizer(
        BPEModel(vocab, _merges(model), unk_token=unk, fuse_unk=True, byte_fallback=model.byte_fallback)
    )
    steps = []
    if model.remove_extra_whitespaces:  # \A and \z: onig's ^ and $ also match beside a newline
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r"\A | \z"), "")]
    if model.add_dummy_prefix:  # even before a leading space (Metaspace's prepend_scheme skips those)
        steps.append(normalizers.Prepend(SPACE))
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    # Exact for every id sequence encoding produces; SentencePiece's own handling of invalid byte runs
    # and control pieces is in sentencepiece_text.py (decoders cannot look across tokens).
    decode = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if model.add_dummy_prefix:
        decode.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(decode)
    return backend


def _merges(model: SentencePieceModel) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, the higher-scored joined piece first."""
    normal = {piece for piece, _, kind in model.pieces if kind == NORMAL}
    ranked: list[tuple[float, int, int, tuple[str, str]]] = []
    for index, (piece, score, kind) in enumerate(model.pieces):
        if kind != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, cut, (left, right)))
    ranked.sort()
    return [pair for _, _, _, pair in ranked]
