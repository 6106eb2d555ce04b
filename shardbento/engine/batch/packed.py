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

logger = logging.getLogger(__name__)

ATTENTION = "shardbento_packed"
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
class PackedRows:
    """Where each prompt is in a packed forward: its cached keys at `cached[i]` = (offset, length) of
    the cache's part, its new tokens at `new[i]` = (offset, length) among the prompts' tokens, which
    follow the running sequences' decode tokens when `decode` is set (a mixed step)."""

    cached: tuple[tuple[int, int], ...]
    new: tuple[tuple[int, int], ...]
    decode: DecodeRows | None = None

    @classmethod
    def of(cls, starts: list[int], lengths: list[int], decode: DecodeRows | None = None) -> PackedRows:
        offsets = [sum(starts[:i]) for i in range(len(starts))]
        at = [sum(lengths[:i]) for i in range(len(lengths))]
        return cls(tuple(zip(offsets, starts, strict=True)), tuple(zip(at, lengths, strict=True)), decode)

    @property
    def cached_tokens(self) -> int:
        return sum(length for _, length in self.cached)

    @property
    def lead(self) -> int:
        """Decode tokens before the prompts' tokens (0 unless a mixed step)."""
        return self.decode.num_rows if self.decode is not None else 0

    def positions(self, decode_positions: Sequence[int] = ()) -> torch.Tensor:
        """Each packed token's rotary position: the decode tokens', then each prompt's from its cached
        length onwards."""
        prompts = [torch.arange(s, s + n) for (_, s), (_, n) in zip(self.cached, self.new, strict=True)]
        return torch.cat([torch.tensor(list(decode_positions), dtype=torch.long), *prompts])

    def last_tokens(self) -> torch.Tensor:
        """The index of each decode token, then of each prompt's last token (their logits pick the next)."""
        return torch.tensor([*range(self.lead), *(self.lead + at + n - 1 for at, n in self.new)])

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
    gqa = query.shape[1] != key.shape[1]
    first = rows.cached_tokens + rows.lead  # the prompts' own keys start here
    outputs = []
    if rows.decode is not None:
        outputs.append(
            _decode_attention(module.layer_idx, rows.decode, query, key, value, rows.cached_tokens, scale)
        )
    for (offset, cached), (at, n) in zip(rows.cached, rows.new, strict=True):
        q = query[:, :, rows.lead + at : rows.lead + at + n]
        own = slice(first + at, first + at + n)
        if cached:
            k = torch.cat([key[:, :, offset : offset + cached], key[:, :, own]], dim=2)
            v = torch.cat([value[:, :, offset : offset + cached], value[:, :, own]], dim=2)
            mask = (
                torch.arange(cached + n, device=q.device)[None, :]
                <= torch.arange(n, device=q.device)[:, None] + cached
            )
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa
            )
        else:
            k, v = key[:, :, own], value[:, :, own]
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=gqa
            )
        outputs.append(out)
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


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
    to its own row; [1, heads, rows, head dim]."""
    n = rows.num_rows
    keys, values = rows.kv.update(
        key[0, :, at : at + n].transpose(0, 1)[:, :, None],  # [rows, kv heads, 1, head dim]
        value[0, :, at : at + n].transpose(0, 1)[:, :, None],
        layer_idx,
    )
    q = query[0, :, :n].transpose(0, 1)[:, :, None]  # [rows, heads, 1, head dim]
    out = torch.nn.functional.scaled_dot_product_attention(
        q,
        keys,
        values,
        attn_mask=rows.mask.to(keys.device)[:, None, None, :],
        scale=scale,
        enable_gqa=q.shape[1] != keys.shape[1],
    )
    return out[:, :, 0].transpose(0, 1)[None]


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, packed_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def enable_packing(model: Any) -> bool:
    """Switch a text model's SDPA attention to the packed-capable one and check, on the model, that two
    prompts packed (one continuing from a cached prefix) give each prompt's own logits and keys; on any
    difference the model keeps its attention and is never packed. Sliding-window and vision models
    are left alone."""
    config = model.config
    if (
        getattr(config, "_attn_implementation", None) not in ("sdpa", ATTENTION)
        or _windowed(config)
        or _vision(config)
    ):
        return False
    _register()
    try:
        model.set_attn_implementation(ATTENTION)
        ok = _packs_right(model)
    except Exception:  # noqa: BLE001 - an unexpected model: it keeps its own attention
        logger.debug("packed prefill check failed", exc_info=True)
        ok = False
    if not ok:
        with contextlib.suppress(Exception):
            model.set_attn_implementation("sdpa")
    logger.info("prompts prefilled together: %s", "packed in one row" if ok else "left-padded")
    return ok


def _packs_right(model: Any) -> bool:
    from transformers import DynamicCache

    device = model.get_input_embeddings().weight.device
    prompts = [list(range(3, 12)), list(range(20, 26))]  # the second continues from 4 cached tokens
    alone = []
    for ids in prompts:
        cache = DynamicCache(config=model.config)
        out = model(input_ids=torch.tensor([ids], device=device), past_key_values=cache, use_cache=True)
        alone.append((out.logits[0, -1], cache))
    cached = 4
    rows = PackedRows.of([0, cached], [len(prompts[0]), len(prompts[1]) - cached])
    cache = DynamicCache(config=model.config)
    for layer_idx, layer in enumerate(alone[1][1].layers):
        cache.update(layer.keys[:, :, :cached], layer.values[:, :, :cached], layer_idx)
    ids = prompts[0] + prompts[1][cached:]
    _local.calls = 0
    with packed_rows(rows):
        out = model(
            input_ids=torch.tensor([ids], device=device),
            position_ids=rows.positions()[None].to(device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=rows.last_tokens().to(device),
        )
    if _local.calls != len(cache.layers):
        return False
    for row, (logits, own) in enumerate(alone):
        keys = torch.cat([cache.layers[0].keys[:, :, at : at + n] for at, n in rows.spans(row)], dim=2)
        if not (close_enough(out.logits[0, row], logits) and close_enough(keys, own.layers[0].keys)):
            return False
    return True


def close_enough(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding of a different summation order in the tensors' dtype."""
    tol = max(1e-4, 8 * torch.finfo(a.dtype).eps)
    return a.shape == b.shape and torch.allclose(a, b, atol=tol, rtol=tol)


def _windowed(config: Any) -> bool:
    text = config.get_text_config()
    types = getattr(text, "layer_types", None) or ()
    return bool(getattr(text, "sliding_window", None)) or any(t != "full_attention" for t in types)


def _vision(config: Any) -> bool:
    return getattr(config, "vision_config", None) is not None
