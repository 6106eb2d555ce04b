"""The model runner: forward passes over the batch's KV cache, driven by the scheduler with plain data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from shardbento.engine.batch.kvslots import SlotKVCache


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """Prompt tokens of one request for one step.

    `start` is the position of the first token (0 for a fresh prompt, more for the next chunk of a
    long one); `slot` is the batch slot the request takes once this chunk completes its prompt, or
    None while more chunks follow; `copies` are more slots that take the same KV (twins: the n choices
    of one prompt, computed once). `inputs` holds a vision prompt's processor outputs (pixel values
    and the like): such a prompt is prefilled whole, alone, and decodes in the batch like text.
    """

    seq_id: int
    token_ids: tuple[int, ...]
    start: int
    slot: int | None
    inputs: dict[str, Any] | None = None
    copies: tuple[int, ...] = ()


class ModelRunner:
    """Owns the model's KV state; every method takes and returns plain data (picklable arguments).

    The scheduler decides, the runner computes: a tensor-parallel follower rank can replay the same
    calls on its shard and stay in step. Fresh prompts are prefilled together in one left-padded
    forward (a batched prefill costs far less per prompt than one forward each on CPU); the rest of a
    chunked prompt runs alone on the request's own transformers cache until its prompt is complete.
    """

    def __init__(self, model: Any, num_slots: int, max_model_len: int) -> None:
        self.model = model
        self.kv = SlotKVCache(num_slots, max_model_len)
        self._device = model.get_input_embeddings().weight.device
        self._additive_mask = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
        self._partial: dict[int, Any] = {}  # seq id -> its prefill cache while chunks remain
        self.num_rows = 0  # slots 0..num_rows-1 hold running sequences

    def prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        """Logits of each chunk's last token, one row per chunk, in order."""
        self.num_rows = max(
            [self.num_rows, *(c.slot + 1 + len(c.copies) for c in chunks if c.slot is not None)]
        )
        fresh = [i for i, c in enumerate(chunks) if c.start == 0 and c.slot is not None and c.inputs is None]
        rows: dict[int, torch.Tensor] = {}
        if fresh:
            logits = self._prefill_fresh([chunks[i] for i in fresh])
            rows.update((i, logits[n]) for n, i in enumerate(fresh))
        for i, chunk in enumerate(chunks):
            if i not in rows:
                rows[i] = self._prefill_chunk(chunk)
        return torch.stack([rows[i] for i in range(len(chunks))])

    def decode(self, token_ids: list[int]) -> torch.Tensor:
        """One token for each of slots 0..n-1 (n = len(token_ids)); logits [n, vocab]."""
        num_rows = len(token_ids)
        lengths = self.kv.lengths[:num_rows]
        kv_len = max(lengths) + 1
        self.kv.begin_step(num_rows, kv_len, self._device)
        starts = torch.tensor(lengths, device=self._device)
        mask = torch.arange(kv_len, device=self._device)[None, :] <= starts[:, None]
        out = self.model(
            input_ids=torch.tensor(token_ids, device=self._device)[:, None],
            position_ids=starts[:, None],
            attention_mask=self._attention_mask(mask)[:, None, None, :],
            past_key_values=self.kv,
            use_cache=True,
            logits_to_keep=1,
        )
        self.kv.advance(num_rows)
        return out.logits[:, -1]

    def release(self, rows: list[int]) -> None:
        """Free rows of the batch; the last row fills each gap (the scheduler mirrors this order)."""
        for row, last in release_moves(rows, self.num_rows):
            if row != last:
                self.kv.move(last, row)
            else:
                self.kv.free(row)
        self.num_rows -= len(rows)

    def drop(self, seq_id: int) -> None:
        """Forget a sequence whose prompt was only partly prefilled."""
        self._partial.pop(seq_id, None)

    def _prefill_fresh(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        from transformers import DynamicCache

        width = max(len(c.token_ids) for c in chunks)
        pads = [width - len(c.token_ids) for c in chunks]
        ids = torch.tensor([[0] * p + list(c.token_ids) for p, c in zip(pads, chunks, strict=True)])
        positions = torch.arange(width)[None, :] - torch.tensor(pads)[:, None]  # negative: left padding
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids.to(self._device),
            attention_mask=(positions >= 0).long().to(self._device),
            position_ids=positions.clamp(min=0).to(self._device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        for row, (pad, chunk) in enumerate(zip(pads, chunks, strict=True)):
            self.kv.load(chunk.slot, cache, row=row, offset=pad)
            self._copy(chunk)
        return out.logits[:, -1]

    def _prefill_chunk(self, chunk: PrefillChunk) -> torch.Tensor:
        from transformers import DynamicCache

        cache = self._partial.get(chunk.seq_id)
        if cache is None:
            cache = DynamicCache(config=self.model.config)
        end = chunk.start + len(chunk.token_ids)
        if chunk.inputs is not None:
            inputs = {
                k: v.to(self._device) if isinstance(v, torch.Tensor) else v for k, v in chunk.inputs.items()
            }
        else:
            inputs = {
                "input_ids": torch.tensor([chunk.token_ids], dtype=torch.long, device=self._device),
                "position_ids": torch.arange(chunk.start, end, device=self._device)[None],
            }
        out = self.model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
        if chunk.slot is None:
            self._partial[chunk.seq_id] = cache
        else:
            self._partial.pop(chunk.seq_id, None)
            self.kv.load(chunk.slot, cache)
            self._copy(chunk)
        return out.logits[0, -1]

    def _copy(self, chunk: PrefillChunk) -> None:
        for slot in chunk.copies:
            self.kv.copy(chunk.slot, slot)

    def _attention_mask(self, keep: torch.Tensor) -> torch.Tensor:
        if not self._additive_mask:
            return keep
        dtype = self.model.dtype
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(
            ~keep, torch.finfo(dtype).min
        )


def release_moves(rows: list[int], num_rows: int) -> list[tuple[int, int]]:
    """(row, last) pairs that remove `rows` from a batch of `num_rows`, filling gaps from the end."""
    moves = []
    for row in sorted(rows, reverse=True):
        num_rows -= 1
        moves.append((row, num_rows))
    return moves
