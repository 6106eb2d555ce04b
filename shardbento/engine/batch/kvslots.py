"""The batched KV cache of the scheduler: one slot per running sequence, rows kept contiguous."""

from __future__ import annotations

from typing import Any

import torch


class SlotKVCache:
    """Keys and values for up to `num_slots` sequences of different lengths, batched in place.

    Running sequences occupy slots 0..n-1, so a decode step reads `buffer[:n, :, :longest]` as a
    view (no re-stacking copy per step); a finished sequence's slot is filled by moving the last
    one into it. Each layer's buffers live on the device of that layer's keys, which makes an
    accelerate layer split work unchanged. Buffers grow by doubling up to `max_len` tokens.

    The model calls `update()` the way it calls a transformers Cache; `begin_step()` says which
    slots and positions the next forward writes.
    """

    def __init__(self, num_slots: int, max_len: int, initial_len: int = 256) -> None:
        self.num_slots = num_slots
        self.max_len = max_len
        self._capacity = min(initial_len, max_len)
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        self.lengths = [0] * num_slots
        self._num_rows = 0
        self._starts: torch.Tensor | None = None
        self._kv_len = 0

    @property
    def is_compileable(self) -> bool:
        return False

    def begin_step(self, num_rows: int, kv_len: int, device: torch.device) -> None:
        """The next forward decodes one token for slots 0..num_rows-1 and attends to kv_len keys."""
        self._ensure_capacity(kv_len)
        self._num_rows = num_rows
        self._starts = torch.tensor(self.lengths[:num_rows], dtype=torch.long, device=device)
        self._kv_len = kv_len

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._layer(layer_idx, key_states)
        rows = torch.arange(self._num_rows, device=keys.device)
        starts = self._starts.to(keys.device)
        keys[rows, :, starts] = key_states[:, :, 0]
        values[rows, :, starts] = value_states[:, :, 0]
        return keys[: self._num_rows, :, : self._kv_len], values[: self._num_rows, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def load(self, slot: int, prefill_cache: Any, row: int = 0, offset: int = 0) -> None:
        """Copy row `row` of a finished prefill (a transformers cache) into `slot`, skipping `offset`
        left-padding positions."""
        length = prefill_cache.get_seq_length() - offset
        self._ensure_capacity(length)
        for layer_idx, layer in enumerate(prefill_cache.layers):
            keys, values = self._layer(layer_idx, layer.keys)
            keys[slot, :, :length] = layer.keys[row, :, offset:]
            values[slot, :, :length] = layer.values[row, :, offset:]
        self.lengths[slot] = length

    def copy(self, source: int, target: int) -> None:
        """Give `target` the sequence held in `source` (both keep it)."""
        length = self.lengths[source]
        for layer_idx in self._keys:
            self._keys[layer_idx][target, :, :length] = self._keys[layer_idx][source, :, :length]
            self._values[layer_idx][target, :, :length] = self._values[layer_idx][source, :, :length]
        self.lengths[target] = length

    def move(self, source: int, target: int) -> None:
        """Put the sequence in `source` into `target` (freeing `source`)."""
        self.copy(source, target)
        self.lengths[source] = 0

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0

    def advance(self, num_rows: int) -> None:
        for slot in range(num_rows):
            self.lengths[slot] += 1

    def usage(self) -> float:
        """Tokens held over the tokens the slots could hold at the model's context length."""
        return sum(self.lengths) / (self.num_slots * self.max_len)

    def _layer(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx not in self._keys:
            shape = (self.num_slots, like.shape[1], self._capacity, like.shape[3])
            self._keys[layer_idx] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self._values[layer_idx] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self._keys[layer_idx], self._values[layer_idx]

    def _ensure_capacity(self, length: int) -> None:
        if length <= self._capacity:
            return
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens exceeds the cache's {self.max_len}")
        capacity = self._capacity
        while capacity < length:
            capacity = min(capacity * 2, self.max_len)
        for store in (self._keys, self._values):
            for layer_idx, old in store.items():
                grown = old.new_zeros((*old.shape[:2], capacity, old.shape[3]))
                grown[:, :, : self._capacity] = old
                store[layer_idx] = grown
        self._capacity = capacity
