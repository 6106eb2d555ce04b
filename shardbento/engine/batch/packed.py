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
import functools
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention.bias import causal_lower_right

from shardbento.engine.batch.selfcheck import Agreement, agreement

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
    first = rows.cached_tokens + rows.lead  # the prompts' own keys start here
    outputs = []
    if rows.decode is not None:
        outputs.append(
            _decode_attention(module.layer_idx, rows.decode, query, key, value, rows.cached_tokens, scale)
        )
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
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


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
    why = ""
    try:
        model.set_attn_implementation(ATTENTION)
        check = _packs_right(model)
        ok, why = check is not None and check.ok, check.describe() if check else "the attention was bypassed"
    except Exception as exc:  # noqa: BLE001 - an unexpected model: it keeps its own attention
        ok, why = False, f"the check failed: {type(exc).__name__}: {exc}"
    if not ok:
        with contextlib.suppress(Exception):
            model.set_attn_implementation("sdpa")
    logger.info(
        "prompts prefilled together: %s (packed against one-by-one on this model: %s)",
        "packed in one row" if ok else "left-padded",
        why,
    )
    return ok


def _packs_right(model: Any) -> Agreement | None:
    """Two prompts packed (one continuing from a cached prefix) against each prompt's own forward:
    logits and keys; None when some layer's attention did not come through the registry."""
    from transformers import DynamicCache

    from shardbento.engine.hf.placement import hidden_states_device, input_device

    device, hidden = input_device(model), hidden_states_device(model)
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
            logits_to_keep=rows.last_tokens().to(hidden),
        )
    if _local.calls != len(cache.layers):
        return None
    checks = []
    for row, (logits, own) in enumerate(alone):
        keys = torch.cat([cache.layers[0].keys[:, :, at : at + n] for at, n in rows.spans(row)], dim=2)
        checks += [agreement(out.logits[0, row], logits), agreement(keys, own.layers[0].keys, top_k=0)]
    return functools.reduce(Agreement.worst, checks)


def _windowed(config: Any) -> bool:
    text = config.get_text_config()
    types = getattr(text, "layer_types", None) or ()
    return bool(getattr(text, "sliding_window", None)) or any(t != "full_attention" for t in types)


def _vision(config: Any) -> bool:
    return getattr(config, "vision_config", None) is not None
