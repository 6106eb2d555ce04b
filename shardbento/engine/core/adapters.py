"""LoRA adapters on the engine's ranks: the catalog's registered on every rank at load, rank 0's names
and ids, and the service's loads and unloads, run on the scheduler's thread between steps."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shardbento.catalog import GENERATED_PREFIX, ModelSpec, catalog_dir
from shardbento.engine.base import Delta
from shardbento.engine.core.messages import LoadAdapter, UnloadAdapter
from shardbento.errors import InvalidRequest, ModelNotFound, ShardbentoError
from shardbento.lora import AdapterError, LoraSource, local_adapter_path

logger = logging.getLogger(__name__)

Deliver = Callable[[list[tuple[int, Any]]], Any]


def adapter_dir(name: str, source: LoraSource) -> str:
    """A catalog adapter's local directory: a path (a relative one is the catalog's, as a Bento carries
    it), a hub download, or a generated tiny adapter."""
    if source.source.startswith(GENERATED_PREFIX):
        from shardbento.tiny.lora import ensure_adapter

        return str(ensure_adapter(source.source.removeprefix(GENERATED_PREFIX)))
    relative = Path(source.source)
    if not source.is_hub and not relative.is_absolute() and (catalog_dir() / relative).is_dir():
        source = LoraSource(source=str(catalog_dir() / relative))
    return str(local_adapter_path(name, source))


def catalog_adapters(spec: ModelSpec) -> list[tuple[int, str, str]]:
    """(id, name, directory) of the entry's adapters, ids from 1 in name order (every rank agrees)."""
    return [
        (i + 1, name, adapter_dir(name, src))
        for i, (name, src) in enumerate(sorted(spec.lora_adapters.items()))
    ]


def register_catalog(runner: Any, spec: ModelSpec) -> list[tuple[int, str, str]]:
    """Give the runner its adapter slots and register the catalog's adapters, each checked against
    the base model (a misfit fails startup naming the adapter and why)."""
    runner.attach_lora(runner.model, spec.max_loras, spec.max_lora_rank)
    adapters = catalog_adapters(spec)
    for uid, name, path in adapters:
        runner.lora_register(uid, name, path)
    return adapters


class AdapterRegistry:
    """Rank 0's adapter names and ids (0 is the base model); the intake thread reads it, the engine
    thread changes it. A name unloaded and loaded again gets a new id, so its prefix-cache blocks and
    device slot are never taken for the old one's."""

    def __init__(self, adapters: list[tuple[int, str, str]]) -> None:
        self._lock = threading.Lock()
        self._ids = {name: uid for uid, name, _ in adapters}
        self._names = {uid: name for uid, name, _ in adapters}
        self._next = len(adapters) + 1

    def id_of(self, name: str) -> int:
        with self._lock:
            uid = self._ids.get(name)
        if uid is None:
            raise ModelNotFound(f"The model {name!r} does not exist (no such LoRA adapter)", param="model")
        return uid

    def name_of(self, uid: int) -> str:
        return self._names.get(uid, f"#{uid}")

    def add(self, name: str) -> int:
        with self._lock:
            uid, self._next = self._next, self._next + 1
            self._ids[name] = uid
            self._names[uid] = name
        return uid

    def remove(self, name: str) -> int:
        with self._lock:
            if name not in self._ids:
                raise ModelNotFound(f"The lora adapter '{name}' cannot be found.", param="lora_name")
            return self._ids.pop(name)

    @staticmethod
    def salt(uid: int) -> int:
        """The prefix-cache salt of an adapter's requests: blocks computed under it stay its own."""
        return hash(("lora", uid)) or 1


class AdapterControl:
    """Rank 0's answers to LoadAdapter/UnloadAdapter. They run as scheduler tasks (never during a
    forward); a load is checked on rank 0 before every rank registers it, so a bad adapter is a 400,
    not ranks out of step."""

    def __init__(self, registry: AdapterRegistry, runner: Any) -> None:
        self._registry = registry
        self._runner = runner  # rank 0's own runner: checks read the adapter here only
        self._deliver: Deliver = lambda items: None
        self._scheduler: Any = None
        self._mirror: Any = None

    def bind(self, scheduler: Any, mirror: Any, deliver: Deliver) -> None:
        """The loop's scheduler (None: a generate() loop, which serves no adapters), its mirroring
        runner, and where answers go."""
        self._scheduler, self._mirror, self._deliver = scheduler, mirror, deliver

    def handle(self, message: LoadAdapter | UnloadAdapter) -> None:
        if self._scheduler is None:
            refusal = InvalidRequest(
                "this model runs one request at a time through generate(); it serves no LoRA adapters",
                param="lora_name",
            )
            self._deliver([(message.ticket, refusal)])
            return
        self._scheduler.call_soon(functools.partial(self._run, message))

    def _run(self, message: LoadAdapter | UnloadAdapter) -> None:
        try:
            if isinstance(message, LoadAdapter):
                self._runner.lora.read(message.name, message.path)  # raises AdapterError
                uid = self._registry.add(message.name)
                self._mirror.lora_register(uid, message.name, message.path)
                logger.info("LoRA adapter %s loaded from %s", message.name, message.path)
            else:
                uid = self._registry.remove(message.name)
                self._scheduler.adapters.retire(uid)
                logger.info("LoRA adapter %s unloaded (its running requests finish)", message.name)
            answer: Any = Delta("", finish_reason="stop")
        except AdapterError as exc:
            answer = InvalidRequest(str(exc), param="lora_path")
        except ShardbentoError as exc:
            answer = exc
        self._deliver([(message.ticket, answer)])
