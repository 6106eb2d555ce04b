"""A rank's LoRA adapters: every registered one on the host, up to max_loras of them in device slots,
and the slots of the tokens of the forward running now; the runner's adapter calls (plain data)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shardbento.engine.lora.layer import LoraLayer, StepLora, local_size, shard_of
from shardbento.engine.lora.weights import AdapterWeights, linear_modules, read_adapter
from shardbento.lora import AdapterError

logger = logging.getLogger(__name__)


class LoraManager:
    """Adapters of one model (one tensor-parallel shard). Slots are chosen by rank 0's scheduler
    (engine/batch/adapters.py) and reach every rank as plain data, so the ranks' slots agree."""

    def __init__(self, model: Any, num_slots: int, max_rank: int) -> None:
        import torch.distributed as dist

        self.num_slots = num_slots
        self.max_rank = max_rank
        self.linears = linear_modules(model)
        distributed = dist.is_available() and dist.is_initialized()
        self._tp = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        self._dtype = model.dtype
        self.layers: dict[str, LoraLayer] = {}
        self.host: dict[int, AdapterWeights] = {}
        self._slot_modules: dict[int, set[str]] = {}
        self.step: StepLora | None = None

    def read(self, name: str, path: str) -> AdapterWeights:
        """The adapter checked against this model (and this rank's shard of it); AdapterError otherwise."""
        weights = read_adapter(name, Path(path), self.linears, self.max_rank)
        for module in weights.modules:
            self._check_shardable(name, module)
        return weights

    def register(self, uid: int, name: str, path: str) -> None:
        """Keep the adapter on the host; the layers it targets get their device slots now."""
        self.host[uid] = self.read(name, path)
        for module in self.host[uid].modules:
            self._layer(module)
        logger.info("LoRA adapter %s (rank %d, %d layers) registered", name, self.host[uid].rank,
                    len(self.host[uid].modules))  # fmt: skip

    def place(self, uid: int, slot: int) -> None:
        """Copy a registered adapter into device slot `slot` (what it held before is cleared)."""
        self.clear(slot)
        weights = self.host[uid]
        for module, (a, b) in weights.modules.items():
            self._layer(module).set(slot, a, b)
        self._slot_modules[slot] = set(weights.modules)

    def forget(self, uid: int, slot: int) -> None:
        """Drop an unloaded adapter's host copy and its device slot (-1: it held none)."""
        self.host.pop(uid, None)
        if slot >= 0:
            self.clear(slot)

    def clear(self, slot: int) -> None:
        for module in self._slot_modules.pop(slot, ()):
            self.layers[module].clear(slot)

    @contextlib.contextmanager
    def tokens(self, slots: list[int]) -> Iterator[None]:
        """Each token of the forward inside is multiplied by its slot's adapter (-1: none)."""
        self.step = StepLora.of(slots, self.max_rank, self.num_slots)
        try:
            yield
        finally:
            self.step = None

    def _layer(self, module: str) -> LoraLayer:
        """The module's stacked slots, made (and its forward wrapped) when an adapter first targets it."""
        layer = self.layers.get(module)
        if layer is None:
            linear = self.linears[module]
            shard = shard_of(linear, self._tp[1])
            layer = LoraLayer(
                linear, self.num_slots, self.max_rank, shard, self._tp, lambda: self.step, self._dtype
            )
            self.layers[module] = layer
        return layer

    def _check_shardable(self, name: str, module: str) -> None:
        """A tensor-parallel shard's adapter part must line up with how its weight was split."""
        linear = self.linears[module]
        shard = shard_of(linear, self._tp[1])
        if shard == "none":
            return
        weight = linear.weight.to_local() if hasattr(linear.weight, "to_local") else linear.weight
        dim, full = (0, linear.out_features) if shard == "colwise" else (1, linear.in_features)
        rank, world = self._tp
        if weight.shape[dim] != local_size(full, world, rank, True):
            raise AdapterError(
                name,
                f"tensor parallelism split {module} unevenly ({weight.shape[dim]} of {full} on rank "
                f"{rank}); serve this model with parallel: layers to use the adapter",
            )


class AdapterCalls:
    """The runner's adapter methods (mirrored to tensor-parallel followers: plain-data arguments)."""

    lora: LoraManager | None = None

    def attach_lora(self, model: Any, num_slots: int, max_rank: int) -> None:
        self.lora = LoraManager(model, num_slots, max_rank)

    def lora_register(self, uid: int, name: str, path: str) -> None:
        self.lora.register(uid, name, path)

    def lora_place(self, uid: int, slot: int) -> None:
        self.lora.place(uid, slot)

    def lora_forget(self, uid: int, slot: int) -> None:
        self.lora.forget(uid, slot)

    def adapters_of(self, slots: list[int]) -> contextlib.AbstractContextManager[None]:
        """The context a forward runs in: its tokens' adapter slots (row-major over its batch)."""
        if self.lora is None:
            return contextlib.nullcontext()
        return self.lora.tokens(slots)
