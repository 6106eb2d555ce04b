"""GLM-4's tiktoken `tokenizer.model` (a base64 token and its rank per line) as a byte-level BPE in
`tokenizers`, with GLM-4's split pattern."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from shardbento.thudm.errors import TokenizerFormatError

# GLM-4's split pattern (cl100k's, with a greedy letters run and digits in threes).
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def read_tiktoken(path: Path) -> dict[bytes, int]:
    """Each token's bytes and rank; the ranks must be 0..n-1."""
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


def tiktoken_backend(ranks: dict[bytes, int], path: Path) -> Any:
    """tiktoken's ranks as a byte-level BPE: each token's merge is the pair its own bytes reduce to under
    the lower ranks; a pre-split piece that is itself a token is kept whole, as tiktoken does."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

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
