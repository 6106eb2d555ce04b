"""The service's view of an engine's LoRA adapters: the names requests may use, and runtime loads and
unloads checked here (vLLM's answers and messages) before the engine does its part."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from shardbento.catalog import ModelSpec
from shardbento.errors import InvalidRequest, ModelNotFound
from shardbento.lora import ADAPTER_CONFIG, check_adapter_name

Send = Callable[..., Awaitable[None]]


class AdapterSet:
    """The catalog entry's adapters, then those loaded at run time; `send_load(name, path)` and
    `send_unload(name)` are the engine's part (rank 0's registry, or vLLM's add_lora)."""

    def __init__(self, spec: ModelSpec, send_load: Send, send_unload: Send) -> None:
        self._base = spec.name
        self._names = {name: spec.lora_adapters[name].source for name in sorted(spec.lora_adapters)}
        self._send_load = send_load
        self._send_unload = send_unload
        self._lock = asyncio.Lock()

    def names(self) -> list[str]:
        return list(self._names)

    def source(self, name: str) -> str:
        """Where the adapter came from: its catalog source or the path it was loaded from."""
        return self._names[name]

    async def load(self, name: str, path: str) -> None:
        try:
            check_adapter_name(name, self._base)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="lora_name") from None
        directory = Path(path).expanduser()
        if not (directory / ADAPTER_CONFIG).is_file():
            raise InvalidRequest(
                f"lora_path {path!r} is not a PEFT adapter directory on this server (no {ADAPTER_CONFIG})",
                param="lora_path",
            )
        async with self._lock:
            if name in self._names:
                raise InvalidRequest(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
            await self._send_load(name, str(directory.resolve()))
            self._names[name] = str(directory.resolve())

    async def unload(self, name: str) -> None:
        async with self._lock:
            if name not in self._names:
                raise ModelNotFound(f"The lora adapter '{name}' cannot be found.", param="lora_name")
            await self._send_unload(name)
            self._names.pop(name)
