"""LoRA adapters at the HTTP edge: a request's adapter checked by name, and vLLM's runtime
load_lora_adapter / unload_lora_adapter endpoints (off unless SHARDBENTO_ALLOW_RUNTIME_LORA_UPDATING)."""

from __future__ import annotations

from typing import Any

from shardbento.engine.base import Adapters
from shardbento.errors import HTTPError, InvalidRequest, ModelNotFound

RUNTIME_SWITCH = "SHARDBENTO_ALLOW_RUNTIME_LORA_UPDATING"


def check_adapter(adapter: str | None, names: list[str]) -> None:
    """A typed API's `adapter` (or a /v1 `model` already resolved) must be one the engine serves."""
    if adapter is not None and adapter not in names:
        raise ModelNotFound(
            f"The LoRA adapter {adapter!r} does not exist; this server serves {', '.join(names) or 'none'}",
            param="adapter",
        )


def runtime_adapters(adapters: Adapters | None, allowed: bool) -> Adapters:
    """The engine's adapters when runtime updating is on; a 404 naming the switch otherwise (vLLM
    serves no such route then)."""
    if not allowed:
        raise HTTPError(
            f"runtime LoRA adapter loading is off; set {RUNTIME_SWITCH}=1 to serve this endpoint",
            status=404,
        )
    if adapters is None:
        raise InvalidRequest("this engine serves no LoRA adapters", param="lora_name")
    return adapters


async def load_adapter(adapters: Adapters | None, allowed: bool, request: Any) -> str:
    """vLLM's answer text on success."""
    await runtime_adapters(adapters, allowed).load(request.lora_name, request.lora_path)
    return f"Success: LoRA adapter '{request.lora_name}' added successfully."


async def unload_adapter(adapters: Adapters | None, allowed: bool, request: Any) -> str:
    await runtime_adapters(adapters, allowed).unload(request.lora_name)
    return f"Success: LoRA adapter '{request.lora_name}' removed successfully."
