"""Which LoRA adapters hold the device's slots: the scheduler admits waiting requests whose adapters fit
beside the running ones, least recently used adapters leave first, unloaded ones once nothing uses them."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from shardbento.engine.batch.sequence import Sequence


class AdapterSlots:
    """Rank 0's scheduler decides which adapter is in which of `num_slots` device slots; the runner (a
    MirrorRunner: every rank) copies (`lora_place`) and forgets (`lora_forget`) as told, so each
    forward's slots mean the same adapter on every rank. An adapter some running (or partly
    prefilled) request uses is never evicted: running sequences keep their `lora_slot`."""

    def __init__(self, runner: Any, num_slots: int, name_of: Callable[[int], str], metrics: Any) -> None:
        self._runner = runner
        self.num_slots = num_slots
        self._name_of = name_of
        self._metrics = metrics
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, least recent first
        self._free = list(range(num_slots))
        self._retired: set[int] = set()  # unloaded: forgotten once no request holds them
        self._reported = ("", "")  # reported once a request names an adapter (as the vLLM engine)

    def slots(self, running: list[Sequence]) -> tuple[list[int], ...]:
        """The running rows' adapter slots, as the runner's forwards take them (their last argument)."""
        return ([seq.lora_slot for seq in running],)

    def retire(self, adapter: int) -> None:
        """An unloaded adapter: requests that hold it finish; then its slot and host copy go."""
        self._retired.add(adapter)

    def admit(
        self,
        candidates: list[Sequence],
        running: list[Sequence],
        chunking: Sequence | None,
        waiting: Iterable[Sequence],
    ) -> list[Sequence]:
        """The longest prefix of `candidates` (FIFO) whose adapters fit the slots beside the running
        requests' adapters; each gets its adapter's slot (placed now when it was not on the device)."""
        in_use = {seq.adapter for seq in running if seq.adapter}
        if chunking is not None and chunking.adapter:
            in_use.add(chunking.adapter)
        waiting = list(waiting)
        self._sweep(in_use | {seq.adapter for seq in waiting})
        admitted = []
        for seq in candidates:
            if seq.adapter and seq.adapter not in in_use:
                if len(in_use) >= self.num_slots:
                    break  # it waits until a running adapter's requests are done
                in_use.add(seq.adapter)
            admitted.append(seq)
        for adapter in sorted(in_use):
            self._make_resident(adapter, in_use)
        for seq in admitted:
            seq.lora_slot = self._slot_of[seq.adapter] if seq.adapter else -1
        self._report(running, waiting)
        return admitted

    def _make_resident(self, adapter: int, in_use: set[int]) -> None:
        if adapter in self._slot_of:
            self._slot_of.move_to_end(adapter)
            return
        if self._free:
            slot = self._free.pop(0)
        else:
            victim = next(a for a in self._slot_of if a not in in_use)  # admit() kept len(in_use) <= slots
            slot = self._slot_of.pop(victim)
        self._runner.lora_place(adapter, slot)
        self._slot_of[adapter] = slot

    def _sweep(self, held: set[int]) -> None:
        for adapter in sorted(self._retired - held):
            slot = self._slot_of.pop(adapter, -1)
            if slot >= 0:
                self._free.append(slot)
            self._runner.lora_forget(adapter, slot)
            self._retired.discard(adapter)

    def _report(self, running: list[Sequence], waiting: list[Sequence]) -> None:
        """vLLM's lora_requests_info: the adapters of running and of waiting requests, when they change."""
        names = tuple(
            ",".join(sorted({self._name_of(seq.adapter) for seq in seqs if seq.adapter}))
            for seqs in (running, waiting)
        )
        if names != self._reported:
            self._reported = names
            self._metrics.lora_info(*names)


class NoAdapters:
    """A scheduler without LoRA adapters: every candidate is admitted, forwards get no slots."""

    def admit(self, candidates: list[Sequence], *_: Any) -> list[Sequence]:
        return candidates

    def slots(self, running: list[Sequence]) -> tuple[list[int], ...]:
        return ()


NO_ADAPTERS = NoAdapters()
