"""The model runner: forward passes over the batch's KV cache, driven by the scheduler with plain data."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from shardbento.engine.batch.kvslots import SlotKVCache
from shardbento.engine.batch.packed import DecodeRows, PackedRows, enable_packing, packed_rows
from shardbento.engine.batch.selfcheck import agreement
from shardbento.engine.hf.placement import hidden_states_device, input_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """Prompt tokens of one request for one step.

    `start` is the position of the first token (0 for a fresh prompt, more for the next chunk of a
    long one); `slot` is the batch slot the request takes once this chunk completes its prompt, or
    None while more chunks follow; `copies` are more slots that take the same KV (twins: the n choices
    of one prompt, computed once); `prefix` names cached KV blocks the chunk continues from. `inputs` holds a vision prompt's processor outputs (pixel values
    and the like): such a prompt is prefilled whole, alone, and decodes in the batch like text.
    """

    seq_id: int
    token_ids: tuple[int, ...]
    start: int
    slot: int | None
    inputs: dict[str, Any] | None = None
    copies: tuple[int, ...] = ()
    prefix: tuple[int, ...] = ()  # cached blocks that hold tokens 0..start-1 (prefix caching)
    length: int = 0  # a chunk of a longer prompt: the whole prompt's tokens (its row's width is set once)


class ModelRunner:
    """Owns the model's KV state; every method takes and returns plain data (picklable arguments).

    The scheduler decides, the runner computes: a tensor-parallel follower rank can replay the same
    calls on its shard and stay in step. Fresh prompts are prefilled together in one left-padded
    forward (a batched prefill costs far less per prompt than one forward each on CPU); the rest of a
    chunked prompt runs alone on the request's own transformers cache until its prompt is complete.
    """

    def __init__(
        self, model: Any, num_slots: int, max_model_len: int, pool_tokens: int | None = None
    ) -> None:
        self.model = model
        self.kv = SlotKVCache(num_slots, max_model_len, pool_tokens or num_slots * max_model_len)
        self.pool_source = "max_num_seqs x max_model_len"
        self._device = input_device(model)  # input ids, positions and masks go here
        self._hidden_device = hidden_states_device(model)  # logits_to_keep's indices go here
        self._additive_mask = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
        self._partial: tuple[int, int] | None = None  # (seq id, row) of a prompt prefilled in chunks
        self.num_rows = 0  # slots 0..num_rows-1 hold running sequences
        # Fresh prompts prefilled together go packed in one row (packed.py) once allocate_pool() has
        # checked the model packs right; each then computes only its tokens past its cached prefix.
        self.packs = False
        self.mixes = False  # and the running rows' decode tokens go in that same forward (mixed steps)

    def prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        """Logits of each chunk's last token, one row per chunk, in order. The pool is first laid out
        for the rows and lengths after this step (the scheduler checked that they fit)."""
        self._lay_out([c for c in chunks if c.slot is not None])
        fresh = [
            i
            for i, c in enumerate(chunks)
            if c.slot is not None and c.inputs is None and (c.start == 0 or c.prefix)
        ]
        rows: dict[int, torch.Tensor] = {}
        if fresh:
            together = [chunks[i] for i in fresh]
            packed = self.packs and len(together) > 1
            logits = self._prefill_packed(together) if packed else self._prefill_fresh(together)
            rows.update((i, logits[n]) for n, i in enumerate(fresh))
        for i, chunk in enumerate(chunks):
            if i not in rows:
                rows[i] = self._prefill_chunk(chunk)
        return torch.stack([rows[i] for i in range(len(chunks))])

    def _lay_out(self, completing: list[PrefillChunk]) -> None:
        """Fit the pool to the rows and lengths after this step (the scheduler checked that they fit)."""
        if completing:
            rows = max(self.num_rows, *(c.slot + 1 + len(c.copies) for c in completing))
            longest = max(
                [length + 1 for length in self.kv.lengths[: self.num_rows]]
                + [c.start + len(c.token_ids) + 1 for c in completing]
            )
            self.kv.fit(rows, longest)
        self.num_rows = max([self.num_rows, *(c.slot + 1 + len(c.copies) for c in completing)])

    def mixed(self, chunks: list[PrefillChunk], token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward for a decode token of each of slots 0..n-1 (n = len(token_ids)) and complete
        fresh prompts packed after them (their slots from n on), as vLLM's mixed batches: a step's
        prompts cost no decode forward of their own. Logits of the prompts [chunks, vocab] and of the
        decode tokens [n, vocab]."""
        self._lay_out(chunks)
        n = len(token_ids)
        decode = DecodeRows(self.kv, n, self._begin_decode(n))
        logits = self._prefill_packed(chunks, decode, token_ids)
        return logits[n:], logits[:n]

    def decode(self, token_ids: list[int]) -> torch.Tensor:
        """One token for each of slots 0..n-1 (n = len(token_ids)); logits [n, vocab]."""
        num_rows = len(token_ids)
        mask = self._begin_decode(num_rows)
        out = self.model(
            input_ids=torch.tensor(token_ids, device=self._device)[:, None],
            position_ids=torch.tensor(self.kv.positions(num_rows), device=self._device)[:, None],
            attention_mask=self._attention_mask(mask)[:, None, None, :],
            past_key_values=self.kv,
            use_cache=True,
            logits_to_keep=1,
        )
        self.kv.advance(num_rows)
        return out.logits[:, -1]

    def _begin_decode(self, num_rows: int) -> torch.Tensor:
        """Ready the KV pool for one new token in each of rows 0..num_rows-1: the rows' keys mask
        [rows, kv_len] (each row sees its own tokens and the new one)."""
        lengths = self.kv.lengths[:num_rows]
        kv_len = max(lengths) + 1
        self.kv.begin_step(num_rows, kv_len, self._device)
        starts = torch.tensor(lengths, device=self._device)
        return torch.arange(kv_len, device=self._device)[None, :] <= starts[:, None]

    def allocate_pool(self, limits: Any) -> int:
        """Size the KV pool by the one rule (plan.memory.kv_pool_tokens) after a warm-up forward of a
        full prefill chunk, and allocate it now, at load; tensor-parallel ranks (every rank calls this,
        in step) agree on the smallest. Returns the pool's tokens."""
        from shardbento.plan.memory import kv_pool_tokens

        per_token = self._kv_bytes_per_token(min(limits.max_prefill_tokens, self.kv.max_len))
        free = None
        if any(device.startswith("cuda") for device in per_token):
            free = {d: _usable_cuda_bytes(d, limits.gpu_memory_utilization) for d in per_token}
        tokens, source = kv_pool_tokens(
            limits, per_token, max_num_seqs=self.kv.num_slots, max_model_len=self.kv.max_len, free_bytes=free
        )
        tokens = _smallest_of_ranks(tokens, self._device)
        if tokens < min(16, self.kv.max_len):
            raise RuntimeError(
                f"no memory left for the KV cache: a pool of {tokens} tokens ({source}); "
                "lower max_model_len, use more or larger GPUs, or set limits.kv_cache_tokens"
            )
        self.kv = SlotKVCache(self.kv.num_slots, self.kv.max_len, tokens)
        self.pool_source = source
        self.prefill([PrefillChunk(-1, (0,), 0, 0)])  # every layer's pool is allocated by this forward
        self.release([0])
        self.packs = _smallest_of_ranks(int(enable_packing(self.model)), self._device) == 1
        self.mixes = self.packs and _smallest_of_ranks(int(self._mixes_right()), self._device) == 1
        return tokens

    def _mixes_right(self) -> bool:
        """Whether a mixed step gives the logits that a decode step and a prefill give apart (checked at
        load, on this model: the decode half needs the attention layers' own layer_idx)."""
        first, second = tuple(range(3, 12)), tuple(range(20, 26))
        try:
            self.prefill([PrefillChunk(-1, first, 0, 0)])
            decoded = self.decode([5])
            self.release([0])
            alone = self.prefill([PrefillChunk(-2, second, 0, 0)])
            self.release([0])
            self.prefill([PrefillChunk(-1, first, 0, 0)])
            prompt, decode = self.mixed([PrefillChunk(-2, second, 0, 1)], [5])
            check = agreement(decode, decoded).worst(agreement(prompt, alone))
            ok, why = check.ok, check.describe()
        except Exception as exc:  # noqa: BLE001 - e.g. attention modules without layer_idx: no mixed steps
            ok, why = False, f"the check failed: {type(exc).__name__}: {exc}"
        finally:
            self.release(list(range(self.num_rows)))
        logger.info(
            "running sequences decode in the prompts' forward (mixed steps): %s (mixed against decode "
            "and prefill apart on this model: %s)",
            "yes" if ok else "no",
            why,
        )
        return ok

    def _kv_bytes_per_token(self, num_tokens: int) -> dict[str, int]:
        """KV bytes one token takes on each device, read off a scratch forward's cache."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        ids = torch.zeros((1, num_tokens), dtype=torch.long, device=self._device)
        self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        per_token: dict[str, int] = {}
        for layer in cache.layers:
            keys = getattr(layer, "keys", None)
            if keys is None or keys.numel() == 0:
                continue
            device = str(keys.device)
            per_token[device] = (
                per_token.get(device, 0) + keys.shape[1] * keys.shape[3] * keys.element_size() * 2
            )
        return per_token

    def release(self, rows: list[int]) -> None:
        """Free rows of the batch; the last row fills each gap (the scheduler mirrors this order). A
        prompt being prefilled in chunks keeps the row right after the running ones."""
        for row, last in release_moves(rows, self.num_rows):
            if row != last:
                self.kv.move(last, row)
            else:
                self.kv.free(row)
        self.num_rows -= len(rows)
        if self._partial is not None and self._partial[1] != self.num_rows:
            self.kv.move(self._partial[1], self.num_rows)
            self._partial = (self._partial[0], self.num_rows)
            self.kv.partial_row = self.num_rows

    def store_prefix(self, blocks: list[tuple[int, int, int]]) -> None:
        """Cache full blocks of rows' KV (the scheduler's PrefixIndex chose which, and where)."""
        self.kv.store_prefix(blocks)

    def drop_prefix(self, moves: list[tuple[int, int]], count: int) -> None:
        self.kv.drop_prefix(moves, count)

    def drop(self, seq_id: int) -> None:
        """Forget a sequence whose prompt was only partly prefilled (its row is freed)."""
        if self._partial is not None and self._partial[0] == seq_id:
            self.kv.free(self._partial[1])
            self._partial = self.kv.partial_row = None

    def _prefill_fresh(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        """Complete prompts in one left-padded forward; a chunk with a cached prefix continues from it
        (its first `start` tokens come from the prefix cache, left-padded to the longest such prefix)."""
        from transformers import DynamicCache

        width = max(len(c.token_ids) for c in chunks)
        cached = max(c.start for c in chunks)
        pads = torch.tensor([width - len(c.token_ids) for c in chunks])
        starts = torch.tensor([c.start for c in chunks])
        ids = torch.tensor([[0] * int(p) + list(c.token_ids) for p, c in zip(pads, chunks, strict=True)])
        steps = torch.arange(width)[None, :] - pads[:, None]  # negative: left padding
        mask = steps >= 0
        cache = DynamicCache(config=self.model.config)
        if cached:
            for layer_idx in self.kv.layer_indices():
                cache.update(*self._cached_prefixes(layer_idx, chunks, cached), layer_idx)
            mask = torch.cat([torch.arange(cached)[None, :] >= (cached - starts)[:, None], mask], dim=1)
        out = self.model(
            input_ids=ids.to(self._device),
            attention_mask=mask.long().to(self._device),
            position_ids=(steps + starts[:, None]).clamp(min=0).to(self._device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        for row, chunk in enumerate(chunks):
            self.kv.load(chunk.slot, cache, row=row, offset=cached - chunk.start + int(pads[row]))
            self._copy(chunk)
        return out.logits[:, -1]

    def _prefill_packed(
        self, chunks: list[PrefillChunk], decode: DecodeRows | None = None, token_ids: list[int] = ()
    ) -> torch.Tensor:
        """Complete prompts as one packed row: each chunk's tokens after the other, each attending to its
        own cached prefix (gathered in front, in chunk order) and its own earlier tokens; with `decode`,
        the running rows' `token_ids` go first (a mixed step). Logits: decode rows', then the prompts'."""
        from transformers import DynamicCache

        rows = PackedRows.of([c.start for c in chunks], [len(c.token_ids) for c in chunks], decode)
        cache = DynamicCache(config=self.model.config)
        if rows.cached_tokens:
            for layer_idx in self.kv.layer_indices():
                parts = [self.kv.prefix(layer_idx, list(c.prefix)) for c in chunks if c.start]
                starts = [c.start for c in chunks if c.start]
                keys = torch.cat([k[:, :, :n] for (k, _), n in zip(parts, starts, strict=True)], dim=2)
                values = torch.cat([v[:, :, :n] for (_, v), n in zip(parts, starts, strict=True)], dim=2)
                cache.update(keys, values, layer_idx)
        ids = [*token_ids, *(token for chunk in chunks for token in chunk.token_ids)]
        positions = rows.positions(self.kv.positions(len(token_ids)))
        with packed_rows(rows):
            out = self.model(
                input_ids=torch.tensor([ids], device=self._device),
                position_ids=positions[None].to(self._device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=rows.last_tokens().to(self._hidden_device),
            )
        self.kv.advance(len(token_ids))  # the decode rows' new tokens are in their rows
        for row, chunk in enumerate(chunks):
            self.kv.load(chunk.slot, cache, spans=rows.spans(row))
            self._copy(chunk)
        return out.logits[0]

    def _cached_prefixes(
        self, layer_idx: int, chunks: list[PrefillChunk], width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each chunk's first `start` tokens of KV from the prefix cache, right-aligned in `width`."""
        rows: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for row, chunk in enumerate(chunks):
            if chunk.start:
                keys, values = self.kv.prefix(layer_idx, list(chunk.prefix))
                rows.append((row, keys[0, :, : chunk.start], values[0, :, : chunk.start]))
        like = rows[0][1]
        shape = (len(chunks), like.shape[0], width, like.shape[2])
        keys, values = (like.new_zeros(shape) for _ in range(2))
        for row, k, v in rows:
            keys[row, :, width - k.shape[1] :] = k
            values[row, :, width - v.shape[1] :] = v
        return keys, values

    def _prefill_chunk(self, chunk: PrefillChunk) -> torch.Tensor:
        """A vision prompt whole (pixels in the same forward) or a chunk of a long text prompt."""
        if chunk.inputs is None:
            return self._prefill_row_chunk(chunk)
        from transformers import DynamicCache

        inputs = {
            k: v.to(self._device) if isinstance(v, torch.Tensor) else v for k, v in chunk.inputs.items()
        }
        cache = DynamicCache(config=self.model.config)
        out = self.model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
        self.kv.load(chunk.slot, cache, position_offset=int(getattr(out, "position_delta", None) or 0))
        self._copy(chunk)
        return out.logits[0, -1]

    def _prefill_row_chunk(self, chunk: PrefillChunk) -> torch.Tensor:
        """One chunk of a prompt prefilled over several steps, straight into its row of the KV pool (the
        row after the running ones, laid out once for the whole prompt): each chunk attends to the
        earlier ones where they are, so a long prompt needs no cache of its own beside the pool. The
        last chunk's row is the slot the prompt joins the batch in."""
        if self._partial is None or self._partial[0] != chunk.seq_id:
            if self._partial is not None:  # another prompt's chunks were abandoned (the scheduler resets it)
                self.drop(self._partial[0])
            row = chunk.slot if chunk.slot is not None else self.num_rows
            self._partial, self.kv.partial_row = (chunk.seq_id, row), row
            longest = max([n + 1 for n in self.kv.lengths[: self.num_rows]] + [chunk.length + 1])
            self.kv.fit(self.num_rows, longest)
            if chunk.prefix:
                self.kv.load_prefix(row, list(chunk.prefix), chunk.start)
        row = self._partial[1]
        end = chunk.start + len(chunk.token_ids)
        keep = (
            torch.arange(end, device=self._device)[None, :]
            <= torch.arange(chunk.start, end, device=self._device)[:, None]
        )
        self.kv.begin_chunk(row, chunk.start, len(chunk.token_ids))
        try:
            out = self.model(
                input_ids=torch.tensor([chunk.token_ids], dtype=torch.long, device=self._device),
                position_ids=torch.arange(chunk.start, end, device=self._device)[None],
                attention_mask=self._attention_mask(keep)[None, None],
                past_key_values=self.kv,
                use_cache=True,
                logits_to_keep=1,
            )
        finally:
            self.kv.end_chunk()
        if chunk.slot is not None:  # the prompt is complete: its row joins the batch where it is
            self._partial = self.kv.partial_row = None
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


def _usable_cuda_bytes(device: str, utilization: float) -> int:
    """What the KV pool may take on a GPU: its share of the memory less what is in use now (weights and
    the warm-up's activations, which torch's allocator keeps reserved)."""
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return int(total * utilization) - (total - free)


def _smallest_of_ranks(tokens: int, device: torch.device) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return tokens
    value = torch.tensor([tokens], dtype=torch.long, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())
