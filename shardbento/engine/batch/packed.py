"""Packed prefill: several prompts as one row of tokens, no padding, each attending only to its own tokens.

A padded batch computes every row as wide as the widest remainder past its cached prefix: rows with
less to compute are padded (or recompute cached tokens), and the padding costs what real tokens cost.
Packed, the forward computes exactly the prompts' new tokens. The attention is done row by row, each
prompt's queries against its own cached prefix and its own keys (vLLM's varlen attention does the
same in one kernel), so long cached prefixes never meet the other rows' queries.

A mixed step packs the running sequences' decode tokens in front of the prompts: their queries attend
to their own KV rows of the batch's SlotKVCache (their new keys written there first), as a decode step's.

The model runs under an attention implementation registered here, which is transformers' SDPA except
inside `packed_rows()`, where it reads the rows' layout from a thread-local (not from the forward's
kwargs, which not every model passes down). Whether a model can be packed is checked on the model
itself (`enable_packing`: packed logits equal the rows' own forwards), so a model whose attention
does not come through the registry is never packed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention.bias import causal_lower_right

logger = logging.getLogger(__name__)

ATTENTION = "shardbento_packed"
# Devices whose fused attention kernels take a mask or enable_gqa but not both: a layer's keys and values
# are repeated per query head once there when its prompts attend to cached prefixes (a mask).
REPEAT_KV_DEVICES = frozenset({"cuda"})
_local = threading.local()


@dataclass(frozen=True)
class DecodeRows:
    """A mixed step's running sequences: one token each for KV rows 0..num_rows-1 of `kv` (a
    SlotKVCache readied by begin_step, as for a decode step), packed before the prompts; `mask` is the
    rows' keys mask [rows, kv_len], made once for every layer."""

    kv: Any
    num_rows: int
    mask: torch.Tensor


@dataclass(frozen=True)
class RowChunk:
    """A chunk of a prompt prefilled in its own row of `kv` (a SlotKVCache), packed after the other
    prompts: its keys go to positions `start`.. of `row` and its queries attend to that row up to them,
    so the earlier chunks are read where they are, never copied."""

    kv: Any
    row: int
    start: int
    num_tokens: int


@dataclass(frozen=True)
class PackedRows:
    """Where each prompt is in a packed forward: its cached keys at `cached[i]` = (offset, length) of
    the cache's part, its new tokens at `new[i]` = (offset, length) among the prompts' tokens, which
    follow the running sequences' decode tokens when `decode` is set (a mixed step); `row`, a chunk of a
    prompt growing in its pool row, comes last."""

    cached: tuple[tuple[int, int], ...]
    new: tuple[tuple[int, int], ...]
    decode: DecodeRows | None = None
    row: RowChunk | None = None

    @classmethod
    def of(
        cls,
        starts: list[int],
        lengths: list[int],
        decode: DecodeRows | None = None,
        row: RowChunk | None = None,
    ) -> PackedRows:
        offsets = [sum(starts[:i]) for i in range(len(starts))]
        at = [sum(lengths[:i]) for i in range(len(lengths))]
        return cls(
            tuple(zip(offsets, starts, strict=True)), tuple(zip(at, lengths, strict=True)), decode, row
        )

    @property
    def new_tokens(self) -> int:
        """The prompts' own tokens (the row chunk's follow them)."""
        return sum(n for _, n in self.new)

    @property
    def cached_tokens(self) -> int:
        return sum(length for _, length in self.cached)

    @property
    def lead(self) -> int:
        """Decode tokens before the prompts' tokens (0 unless a mixed step)."""
        return self.decode.num_rows if self.decode is not None else 0

    def positions(self, decode_positions: Sequence[int] = ()) -> torch.Tensor:
        """Each packed token's rotary position: the decode tokens', then each prompt's from its cached
        length onwards, then the row chunk's from its start."""
        prompts = [torch.arange(s, s + n) for (_, s), (_, n) in zip(self.cached, self.new, strict=True)]
        if self.row is not None:
            prompts.append(torch.arange(self.row.start, self.row.start + self.row.num_tokens))
        return torch.cat([torch.tensor(list(decode_positions), dtype=torch.long), *prompts])

    def last_tokens(self) -> torch.Tensor:
        """The index of each decode token, then of each prompt's last token and the row chunk's (their
        logits pick the next)."""
        last = [*range(self.lead), *(self.lead + at + n - 1 for at, n in self.new)]
        if self.row is not None:
            last.append(self.lead + self.new_tokens + self.row.num_tokens - 1)
        return torch.tensor(last)

    def spans(self, row: int) -> list[tuple[int, int]]:
        """(offset, length) of prompt `row`'s keys in a layer's cache after the forward: cached, then new."""
        (offset, cached), (at, n) = self.cached[row], self.new[row]
        return [(offset, cached), (self.cached_tokens + self.lead + at, n)]


@contextlib.contextmanager
def packed_rows(rows: PackedRows) -> Iterator[None]:
    _local.rows = rows
    try:
        yield
    finally:
        _local.rows = None


def packed_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows: PackedRows | None = getattr(_local, "rows", None)
    if rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    _local.calls = getattr(_local, "calls", 0) + 1
    scale = kwargs.get("scaling")
    first = rows.cached_tokens + rows.lead  # the prompts' own keys start here
    outputs = []
    if rows.decode is not None:
        outputs.append(
            _decode_attention(module.layer_idx, rows.decode, query, key, value, rows.cached_tokens, scale)
        )
    if rows.row is not None:
        chunk = _row_attention(module.layer_idx, rows, query, key, value, first, scale)
    gqa = query.shape[1] != key.shape[1]
    if gqa and rows.cached_tokens and query.device.type in REPEAT_KV_DEVICES:
        key, value = repeat_heads(key, query.shape[1]), repeat_heads(value, query.shape[1])
        gqa = False
    for (offset, cached), (at, n) in zip(rows.cached, rows.new, strict=True):
        q = query[:, :, rows.lead + at : rows.lead + at + n]
        own = slice(first + at, first + at + n)
        if cached:  # its queries see the cached prefix and its own keys causally (lower-right aligned)
            k = torch.cat([key[:, :, offset : offset + cached], key[:, :, own]], dim=2)
            v = torch.cat([value[:, :, offset : offset + cached], value[:, :, own]], dim=2)
            mask, causal = causal_lower_right(n, cached + n), False
        else:
            k, v, mask, causal = key[:, :, own], value[:, :, own], None, True
        outputs.append(
            torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
            )
        )
    if rows.row is not None:
        outputs.append(chunk)
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _row_attention(
    layer_idx: int,
    rows: PackedRows,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    first: int,
    scale: float | None,
) -> torch.Tensor:
    """The row chunk's attention: its new keys and values written into its pool row, its queries on
    that row up to them (lower-right causal: each sees the earlier chunks and its own past)."""
    chunk = rows.row
    at, n = first + rows.new_tokens, chunk.num_tokens
    keys, values = chunk.kv.write_chunk(
        layer_idx, chunk.row, chunk.start, key[:, :, at : at + n], value[:, :, at : at + n]
    )
    q = query[:, :, rows.lead + rows.new_tokens : rows.lead + rows.new_tokens + n]
    mask = causal_lower_right(n, chunk.start + n) if chunk.start else None
    return torch.nn.functional.scaled_dot_product_attention(
        q,
        keys,
        values,
        attn_mask=mask,
        is_causal=not chunk.start,
        scale=scale,
        enable_gqa=q.shape[1] != keys.shape[1],
    )


def repeat_heads(states: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Keys or values [batch, kv heads, tokens, dim] with each KV head repeated for its query heads."""
    return states.repeat_interleave(num_heads // states.shape[1], dim=1)


def _decode_attention(
    layer_idx: int,
    rows: DecodeRows,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    at: int,
    scale: float | None,
) -> torch.Tensor:
    """The running sequences' attention in a mixed step: their new keys and values (packed at `at`)
    go into their KV rows through the cache's own update(), as in a decode step, and each token attends
    to its own row; [1, heads, rows, head dim].

    Each row's one query per head is regrouped as [kv heads, queries per kv head]: every query then
    attends to its own KV head's keys with the row's mask, with neither enable_gqa nor a repeat of the
    KV rows (fused CUDA kernels take a mask or enable_gqa, not both)."""
    n = rows.num_rows
    keys, values = rows.kv.update(
        key[0, :, at : at + n].transpose(0, 1)[:, :, None],  # [rows, kv heads, 1, head dim]
        value[0, :, at : at + n].transpose(0, 1)[:, :, None],
        layer_idx,
    )
    heads, kv_heads, dim = query.shape[1], keys.shape[1], query.shape[3]
    q = query[0, :, :n].transpose(0, 1).reshape(n, kv_heads, heads // kv_heads, dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, attn_mask=rows.mask.to(keys.device)[:, None, None, :], scale=scale
    )
    return out.reshape(n, heads, dim).transpose(0, 1)[None]


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, packed_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def windowed(config: Any) -> bool:
    text = config.get_text_config()
    types = getattr(text, "layer_types", None) or ()
    return bool(getattr(text, "sliding_window", None)) or any(t != "full_attention" for t in types)


# Vision models whose text prompts may be packed: their prompts with images are prefilled alone, outside
# packing, and the check below runs their text path (Mllama's skips its cross-attention layers, as a text
# prompt's generate() does; Qwen2-VL's text positions are plain rotary positions).
PACKED_VISION_TYPES = frozenset({"mllama", "qwen2_vl", "qwen2_5_vl"})


def vision(config: Any) -> bool:
    """A vision model whose text prompts are never packed."""
    if getattr(config, "model_type", None) in PACKED_VISION_TYPES:
        return False
    return getattr(config, "vision_config", None) is not None
