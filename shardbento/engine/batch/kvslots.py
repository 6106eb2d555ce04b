"""The batched KV cache of the scheduler: a pool of tokens allocated once, viewed as one row per sequence."""

from __future__ import annotations

from typing import Any

import torch

from shardbento.engine.batch.crossattn import CrossAttentionSlots
from shardbento.engine.hf.placement import device_ints

BLOCK = 64  # row widths are multiples of this: a growing batch re-lays its rows out once per BLOCK steps
PREFIX_BLOCK = 16  # tokens per cached prefix block (vLLM's default block size)


class SlotKVCache:
    """Keys and values of the running sequences in a pool of `pool_tokens` tokens per layer.

    Each layer's pool is allocated once, at its first use (the engine's warm-up forward at load), and
    never grows: its front is viewed as a rectangle [rows, kv heads, width, head dim], one row per
    running sequence, and its tail holds the cached prefix blocks; rows x width + cached blocks never
    pass pool_tokens. Running sequences occupy rows 0..n-1, so a decode step reads
    `view[:n, :, :longest]` (no re-stacking copy per step); a finished sequence's row is filled by
    moving the last one into it. The width (a multiple of BLOCK, or max_len) stays while it serves; when
    the longest sequence outgrows it, or the rows need a narrower one, the rows are laid out again
    inside the same storage (`fit`). Admission and preemption ask `holds()`. Each layer's pool lives on
    the device of that layer's keys, which makes an accelerate layer split work unchanged.

    The model calls `update()` the way it calls a transformers Cache; `begin_step()` says which
    rows and positions the next forward writes. A model with cross-attention layers (Mllama) keeps its
    image keys beside the pool, per row (`cross`, crossattn.py), and reads them through `layers`.
    """

    def __init__(
        self, num_slots: int, max_len: int, pool_tokens: int, cross: CrossAttentionSlots | None = None
    ) -> None:
        self.num_slots = num_slots
        self.cross = cross
        self.max_len = max_len
        self.pool_tokens = pool_tokens
        self.width = max(self.width_for(1), self._roomy_width())
        self._storage: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # flat, never reallocated
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        self.lengths = [0] * num_slots
        # Where a slot's next position is, relative to its length: negative after a GLM-4V image, whose
        # patches share one position (rotary positions are not the cache index there).
        self.position_offsets = [0] * num_slots
        self.prefix_blocks = 0  # cached prefix blocks, kept at the tail of the same storage
        # The row of a prompt prefilled in chunks (after the running rows): its KV grows there, chunk by
        # chunk, and it joins the batch in place when its last chunk is computed.
        self.partial_row: int | None = None
        self._chunk: tuple[int, int, int] | None = None  # (row, start, tokens) of the chunk being computed
        self._num_rows = 0
        self._index: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._tail_index: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}
        self._kv_len = 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def layers(self) -> list[Any]:
        """Mllama's view of its cross-attention layers (`past_key_values.layers[idx]`)."""
        if self.cross is None:
            raise AttributeError("layers")  # the self-attention pool is not a transformers layer list
        return self.cross.layers

    def width_for(self, length: int) -> int:
        """The row width that holds `length` tokens."""
        return min(-(-max(length, 1) // BLOCK) * BLOCK, self.max_len, self.pool_tokens)

    def rows_at(self, width: int) -> int:
        """How many sequences the pool could hold at this width (with no prefix cached)."""
        return min(self.num_slots, self.pool_tokens // width)

    def holds(self, num_rows: int, longest: int, prefix_blocks: int | None = None) -> bool:
        """Whether `num_rows` sequences, the longest `longest` tokens, fit the pool beside the cached
        prefix blocks (by default those held now)."""
        blocks = self.prefix_blocks if prefix_blocks is None else prefix_blocks
        return longest <= min(self.max_len, self.pool_tokens) and self._fits(
            num_rows, self.width_for(longest), blocks
        )

    def fit(self, num_rows: int, longest: int) -> None:
        """Lay `num_rows` rows out so they hold `longest` tokens (the scheduler checked holds()). The
        width stays while it serves; else it becomes the widest that gives every slot a row when the
        pool has that room (with a roomy pool: max_len, never laid out again), else the narrowest."""
        need = self.width_for(longest)
        if self.width >= need and self._fits(num_rows, self.width, self.prefix_blocks):
            return
        roomy = self._roomy_width()
        width = roomy if roomy >= need and self._fits(num_rows, roomy, self.prefix_blocks) else need
        if not self._fits(num_rows, width, self.prefix_blocks):  # a planning error: fail, overwrite nothing
            raise ValueError(
                f"{self.rows_taken(num_rows)} rows of {longest} tokens do not fit a {self.pool_tokens}-token "
                f"pool beside {self.prefix_blocks} cached blocks"
            )
        if width != self.width:
            self._relayout(width, num_rows)

    def rows_taken(self, num_rows: int) -> int:
        """Rows that `num_rows` running sequences take, with the row of a prompt prefilled in chunks
        (it holds its place after the running ones)."""
        return num_rows if self.partial_row is None else max(num_rows, self.partial_row + 1)

    def _fits(self, num_rows: int, width: int, prefix_blocks: int) -> bool:
        num_rows = self.rows_taken(num_rows)
        used = num_rows * width + prefix_blocks * PREFIX_BLOCK
        return num_rows <= self.rows_at(width) and used <= self.pool_tokens

    def _roomy_width(self) -> int:
        """The widest row that still gives every slot one (0 when the pool is smaller than that)."""
        return min(self.max_len, self.pool_tokens // self.num_slots // BLOCK * BLOCK)

    def begin_step(self, num_rows: int, kv_len: int, device: torch.device) -> torch.Tensor:
        """The next forward decodes one token for rows 0..num_rows-1 and attends to kv_len keys; the
        rows' lengths (where each writes its new key) on `device`, returned. Layers on other devices get
        their copy of the index once per step, not once per layer."""
        if kv_len > self.width:
            self.fit(num_rows, kv_len)
        self._num_rows = num_rows
        starts = device_ints([self.lengths[:num_rows]], device)[0]
        self._index = {device: (torch.arange(num_rows, device=device), starts)}
        self._kv_len = kv_len
        return starts

    def _step_index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, their write positions) of this step on `device`, made once per step there."""
        if device not in self._index:
            rows, starts = next(iter(self._index.values()))
            self._index[device] = (rows.to(device), starts.to(device))
        return self._index[device]

    def begin_chunk(self, row: int, start: int, num_tokens: int) -> None:
        """The next forward computes `num_tokens` tokens of one prompt from position `start`: each layer
        writes their keys into `row` and attends to the row up to them (no copy of the earlier chunks)."""
        self._chunk = (row, start, num_tokens)
        if self.cross is not None:
            self.cross.deactivate()  # a text prompt's chunk: no cross-attention

    def end_chunk(self) -> None:
        row, start, num_tokens = self._chunk
        self.lengths[row] = start + num_tokens
        self._chunk = None

    def write_chunk(
        self, layer_idx: int, row: int, start: int, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's keys and values of a chunk ([1, kv heads, tokens, head dim]) written at `start` of
        `row`; the row up to them returned as views (what the chunk's queries attend to)."""
        keys, values = self._layer(layer_idx, key_states)
        end = start + key_states.shape[2]
        keys[row, :, start:end] = key_states[0]
        values[row, :, start:end] = value_states[0]
        return keys[row : row + 1, :, :end], values[row : row + 1, :, :end]

    def load_prefix(self, row: int, blocks: list[int], num_tokens: int) -> None:
        """Put cached blocks' first `num_tokens` tokens of KV at the front of `row` (a chunked prompt that
        starts from a cached prefix)."""
        for layer_idx in self._storage:
            keys, values = self.prefix(layer_idx, blocks)
            self._keys[layer_idx][row, :, :num_tokens] = keys[0, :, :num_tokens]
            self._values[layer_idx][row, :, :num_tokens] = values[0, :, :num_tokens]
        self.lengths[row] = num_tokens

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._chunk is not None:
            row, start, _ = self._chunk
            return self.write_chunk(layer_idx, row, start, key_states, value_states)
        keys, values = self._layer(layer_idx, key_states)
        rows, starts = self._step_index(keys.device)
        keys[rows, :, starts] = key_states[:, :, 0]
        values[rows, :, starts] = value_states[:, :, 0]
        return keys[: self._num_rows, :, : self._kv_len], values[: self._num_rows, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._chunk[1] if self._chunk is not None else self._kv_len

    def load(
        self,
        slot: int,
        prefill_cache: Any,
        row: int = 0,
        offset: int = 0,
        position_offset: int = 0,
        spans: list[tuple[int, int]] | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> None:
        """Copy row `row` of a finished prefill (a transformers cache) into `slot`, skipping `offset`
        left-padding positions, or only its `spans` ((offset, length) pieces, in order: a packed
        prefill's prompt); `position_offset` is the model's own (GLM-4V's image positions, Qwen2-VL's
        rope delta). With cross-attention, `image_mask` (the prompt's last mask row) says the prompt's
        cross-attention keys go to the slot's image state; without it the slot holds no image."""
        if spans is None:
            spans = [(offset, prefill_cache.get_seq_length() - offset)]
        length = sum(n for _, n in spans)
        if length > self.width:
            self.fit(max(slot + 1, self._live_rows()), length)
        cross = self.cross.shape.layers if self.cross is not None else {}
        for layer_idx, layer in enumerate(prefill_cache.layers):
            if layer_idx in cross or not _holds_keys(layer):
                continue  # cross-attention (below), or a layer this prefill skipped
            keys, values = self._layer(layer_idx, layer.keys)
            at = 0
            for start, n in spans:
                keys[slot, :, at : at + n] = layer.keys[row, :, start : start + n]
                values[slot, :, at : at + n] = layer.values[row, :, start : start + n]
                at += n
        self.lengths[slot] = length
        self.position_offsets[slot] = position_offset
        if self.cross is not None:
            if image_mask is not None:
                self.cross.load(slot, prefill_cache, image_mask)
            else:
                self.cross.clear(slot)

    def copy(self, source: int, target: int) -> None:
        """Give `target` the sequence held in `source` (both keep it)."""
        self._copy_row(source, target)
        if self.cross is not None:
            self.cross.copy(source, target)

    def _copy_row(self, source: int, target: int) -> None:
        length = self.lengths[source]
        for layer_idx in self._keys:
            self._keys[layer_idx][target, :, :length] = self._keys[layer_idx][source, :, :length]
            self._values[layer_idx][target, :, :length] = self._values[layer_idx][source, :, :length]
        self.lengths[target] = length
        self.position_offsets[target] = self.position_offsets[source]

    def move(self, source: int, target: int) -> None:
        """Put the sequence in `source` into `target` (freeing `source`)."""
        self._copy_row(source, target)
        self.lengths[source] = self.position_offsets[source] = 0
        if self.cross is not None:
            self.cross.move(source, target)

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0
        self.position_offsets[slot] = 0
        if self.cross is not None:
            self.cross.clear(slot)

    def positions(self, num_rows: int) -> list[int]:
        """Each of the first `num_rows` slots' next rotary position."""
        return [n + d for n, d in zip(self.lengths[:num_rows], self.position_offsets[:num_rows], strict=True)]

    def advance(self, num_rows: int) -> None:
        for slot in range(num_rows):
            self.lengths[slot] += 1

    def store_prefix(self, blocks: list[tuple[int, int, int]]) -> None:
        """Copy full blocks of rows into the prefix cache, one gather per layer: (row, block index in the
        row, cache block) triples; cache blocks are 0..prefix_blocks, the next ones appended."""
        if not blocks:
            return
        count = self.pool_tokens // PREFIX_BLOCK
        index = [
            [row for row, _, _ in blocks],
            [j for _, j, _ in blocks],
            [count - 1 - b for _, _, b in blocks],
        ]
        on: dict[torch.device, torch.Tensor] = {}  # the indices on each device, copied there once
        for layer_idx in self._storage:
            device = self._storage[layer_idx][0].device
            if device not in on:
                on[device] = device_ints(index, device)
            rows, at, tails = on[device]
            for which, store in enumerate((self._keys, self._values)):
                windows = store[layer_idx].unfold(
                    2, PREFIX_BLOCK, PREFIX_BLOCK
                )  # [rows, heads, n, dim, block]
                self._prefix_view(layer_idx, which)[tails] = windows[rows, :, at].transpose(-1, -2)
        self.prefix_blocks = max(self.prefix_blocks, *(b + 1 for _, _, b in blocks))

    def drop_prefix(self, moves: list[tuple[int, int]], count: int) -> None:
        """Forget cached blocks: (from, to) copies fill evicted blocks' places from beyond the `count`
        blocks that remain (a slice copy each: on a CPU cheaper than one indexed gather per layer)."""
        for layer_idx in self._storage:
            for which in (0, 1):
                cache = self._prefix_view(layer_idx, which)
                for source, target in moves:
                    cache[_tail(target, cache)] = cache[_tail(source, cache)]
        self.prefix_blocks = count

    def prefix(self, layer_idx: int, blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of cached blocks, in order: [1, kv heads, len(blocks) x block, head dim]."""
        out = []
        tails = self._tails(tuple(blocks), self._storage[layer_idx][0].device)
        for which in (0, 1):
            picked = self._prefix_view(layer_idx, which)[tails]  # [n, heads, block, dim]
            out.append(picked.permute(1, 0, 2, 3).reshape(1, picked.shape[1], -1, picked.shape[3]))
        return out[0], out[1]

    def _tails(self, blocks: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Cached blocks' rows in the storage's tail view, as an index on `device`: made once per block
        list and device, not once per layer."""
        key = (blocks, device)
        if key not in self._tail_index:
            if len(self._tail_index) > 64:
                self._tail_index.clear()
            count = self.pool_tokens // PREFIX_BLOCK
            self._tail_index[key] = device_ints([[count - 1 - b for b in blocks]], device)[0]
        return self._tail_index[key]

    def layer_indices(self) -> list[int]:
        return sorted(self._storage)

    def usage(self) -> float:
        """The share of the pool the running rows take at the current width (what admission sees) and
        the cached prefix blocks."""
        return (self._live_rows() * self.width + self.prefix_blocks * PREFIX_BLOCK) / self.pool_tokens

    def allocated_bytes(self) -> int:
        pool = sum(k.numel() * k.element_size() * 2 for k, _ in self._storage.values())
        return pool + (self.cross.allocated_bytes() if self.cross is not None else 0)

    def _live_rows(self) -> int:
        return sum(1 for length in self.lengths if length)

    def _layer(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx not in self._keys:
            numel = self.pool_tokens * like.shape[1] * like.shape[3]
            flat = [torch.zeros(numel, dtype=like.dtype, device=like.device) for _ in range(2)]
            self._storage[layer_idx] = (flat[0], flat[1])
            self._keys[layer_idx], self._values[layer_idx] = (
                self._view(t, like.shape[1], like.shape[3], self.width) for t in flat
            )
        return self._keys[layer_idx], self._values[layer_idx]

    def _prefix_view(self, layer_idx: int, which: int) -> torch.Tensor:
        """The storage's tail as [pool // block, heads, block, dim]; cache block b is its row -1-b."""
        flat = self._storage[layer_idx][which]
        heads, head_dim = self._keys[layer_idx].shape[1], self._keys[layer_idx].shape[3]
        count = self.pool_tokens // PREFIX_BLOCK
        size = count * heads * PREFIX_BLOCK * head_dim
        return flat[flat.numel() - size :].view(count, heads, PREFIX_BLOCK, head_dim)

    def _view(self, flat: torch.Tensor, heads: int, head_dim: int, width: int) -> torch.Tensor:
        rows = self.rows_at(width)
        return flat[: rows * heads * width * head_dim].view(rows, heads, width, head_dim)

    def _relayout(self, width: int, num_rows: int) -> None:
        """Rows 0..num_rows-1 (and any other live row) re-laid at `width`, in place: growing, rows move
        to later offsets, so they go last to first; shrinking, first to last. A row is copied out
        before it is written back (one row of transient memory per layer)."""
        live = max([num_rows, *(slot + 1 for slot, n in enumerate(self.lengths) if n)])
        if live > self.rows_at(width):
            raise ValueError(f"{live} sequences do not fit a {self.pool_tokens}-token pool at width {width}")
        order = range(live - 1, -1, -1) if width > self.width else range(live)
        for layer_idx, (flat_k, flat_v) in self._storage.items():
            old_k, old_v = self._keys[layer_idx], self._values[layer_idx]
            heads, head_dim = old_k.shape[1], old_k.shape[3]
            new_k, new_v = (self._view(t, heads, head_dim, width) for t in (flat_k, flat_v))
            for slot in order:
                if not self.lengths[slot]:
                    continue  # an empty row (or one the old layout did not have): nothing to move
                length = min(self.lengths[slot], width)
                row_k, row_v = old_k[slot, :, :length].clone(), old_v[slot, :, :length].clone()
                new_k[slot, :, :length] = row_k
                new_v[slot, :, :length] = row_v
            self._keys[layer_idx], self._values[layer_idx] = new_k, new_v
        self.width = width


def _holds_keys(layer: Any) -> bool:
    keys = getattr(layer, "keys", None)
    return keys is not None and keys.numel() > 0


def _tail(block: int, cache: torch.Tensor) -> int:
    return cache.shape[0] - 1 - block
