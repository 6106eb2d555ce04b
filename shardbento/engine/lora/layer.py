"""One targeted linear's adapters on the device, and the delta each token gets from its own adapter.

Every adapter held on the device has a slot; a layer stacks the slots' A (`[slots x R, in]`) and B
(`[slots x R, out]`, PEFT's scaling folded in), each adapter zero-padded to R = max_lora_rank. A step's
tokens carry their slot (-1: the base model). The delta of a mixed step is computed for all tokens at
once: x @ A_all^T (every slot's low-rank projection), times a [tokens, slots x R] mask that keeps each
token's own slot's columns, @ B_all; a step whose tokens share one adapter multiplies by that slot's
rows alone. (Measured against gathering each adapter's tokens, benchmarks/lora_delta.py.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Shard = Literal["none", "colwise", "rowwise"]


@dataclass
class StepLora:
    """The adapter slots of one forward's tokens (row-major over the batch); masks made once per
    device and dtype, on first use by a layer there."""

    slots: list[int]
    rank: int  # R: each slot's rows in the stacked weights
    num_slots: int
    uniform: int | None = None  # every token uses this slot
    _masks: dict[tuple[Any, Any], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, slots: list[int], rank: int, num_slots: int) -> StepLora | None:
        """None when no token uses an adapter: the layers then cost nothing."""
        distinct = set(slots)
        if distinct <= {-1}:
            return None
        uniform = next(iter(distinct)) if len(distinct) == 1 else None
        return cls(slots, rank, num_slots, uniform)

    def mask(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        if key not in self._masks:
            tokens = torch.tensor(self.slots, device=device)
            columns = torch.arange(self.num_slots * self.rank, device=device) // self.rank
            self._masks[key] = (columns[None, :] == tokens[:, None]).to(dtype)
        return self._masks[key]


class LoraLayer:
    """Wraps one linear's forward (whatever it is by then: oneDNN's packed one, a tensor-parallel
    shard's, bitsandbytes') and adds each token's delta to its output."""

    def __init__(
        self,
        module: Any,
        num_slots: int,
        rank: int,
        shard: Shard,
        tp: tuple[int, int],
        current: Any,
        model_dtype: torch.dtype,
    ) -> None:
        self.num_slots, self.rank, self.shard = num_slots, rank, shard
        self._tp_rank, self._world = tp
        self._current = current  # () -> the forward's StepLora or None
        device = _weight_device(module)
        dtype = _compute_dtype(module, model_dtype)
        self.in_local = local_size(module.in_features, self._world, self._tp_rank, shard == "rowwise")
        self.out_local = local_size(module.out_features, self._world, self._tp_rank, shard == "colwise")
        self.a = torch.zeros(num_slots * rank, self.in_local, device=device, dtype=dtype)
        self.b = torch.zeros(num_slots * rank, self.out_local, device=device, dtype=dtype)
        self._base = module.forward
        module.forward = self.forward

    def set(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Slot `slot` holds A [r, in] and B [out, r] (full; this rank's part is taken here)."""
        if self.shard == "rowwise":
            a = torch.chunk(a, self._world, dim=1)[self._tp_rank]
        elif self.shard == "colwise":
            b = torch.chunk(b, self._world, dim=0)[self._tp_rank]
        rows = slice(slot * self.rank, (slot + 1) * self.rank)
        self.a[rows].zero_()
        self.b[rows].zero_()
        r = a.shape[0]
        self.a[slot * self.rank : slot * self.rank + r] = a.to(self.a)
        self.b[slot * self.rank : slot * self.rank + r] = b.t().to(self.b)

    def clear(self, slot: int) -> None:
        rows = slice(slot * self.rank, (slot + 1) * self.rank)
        self.a[rows].zero_()
        self.b[rows].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base(x)
        step = self._current()
        if step is None:
            return out
        return out + self.delta(step, x).view(out.shape).to(out.dtype)

    def delta(self, step: StepLora, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(self.a.dtype)
        if step.uniform is not None:
            rows = slice(step.uniform * self.rank, (step.uniform + 1) * self.rank)
            return self._reduce(x2 @ self.a[rows].t()) @ self.b[rows]
        low = self._reduce(x2 @ self.a.t())
        return (low * step.mask(low.device, low.dtype)) @ self.b

    def _reduce(self, low: torch.Tensor) -> torch.Tensor:
        """A row-parallel layer's input is split across ranks: its low-rank products are partial sums."""
        if self.shard == "rowwise":
            import torch.distributed as dist

            dist.all_reduce(low)
        return low


def shard_of(module: Any, world: int) -> Shard:
    """How tensor parallelism split this linear's weight: by output rows (colwise), by input columns
    (rowwise) or not at all."""
    if world == 1:
        return "none"
    placements = getattr(module.weight, "placements", None)
    if not placements or not hasattr(placements[0], "dim"):
        return "none"
    return "colwise" if placements[0].dim == 0 else "rowwise"


def local_size(size: int, world: int, rank: int, split: bool) -> int:
    return torch.empty(size, device="meta").chunk(world)[rank].shape[0] if split else size


def _weight_device(module: Any) -> torch.device:
    weight = module.weight
    return weight.to_local().device if hasattr(weight, "to_local") else weight.device


def _compute_dtype(module: Any, model_dtype: torch.dtype) -> torch.dtype:
    """The activations' dtype: the weight's when it is a float, else (bitsandbytes) the model's."""
    dtype = module.weight.dtype
    return dtype if dtype.is_floating_point else getattr(module, "compute_dtype", None) or model_dtype
