"""Test-only fault injection, off by default: with SHARDBENTO_FAULT_INJECTION=1 a request may ask
(header `X-Shardbento-Fault: error|oom`) that its generation raise after the engine's first step.

It exists so tests and `make reliability` can show what a client sees when a generation fails
(one request fails with a 500, the service keeps serving). Never enable it in production.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any

from shardbento.settings import Settings

logger = logging.getLogger(__name__)

FAULT_HEADER = b"x-shardbento-fault"
FAULT_KINDS = ("error", "oom")
REQUESTED_FAULT: ContextVar[str | None] = ContextVar("shardbento_fault", default=None)


class InjectedFault(RuntimeError):
    """A generation failure raised on purpose."""


class InjectedOutOfMemory(InjectedFault):
    """Looks like torch.OutOfMemoryError (also a RuntimeError) to the code that handles it."""


def raise_requested_fault() -> None:
    """Called by the serving layer once a generation is under way; a no-op unless a fault was asked."""
    kind = REQUESTED_FAULT.get()
    if kind == "oom":
        raise InjectedOutOfMemory("CUDA out of memory. Tried to allocate 2.00 GiB (injected fault)")
    if kind == "error":
        raise InjectedFault("injected generation fault")


class FaultInjectionMiddleware:
    """Reads the fault header only when SHARDBENTO_FAULT_INJECTION is 1; otherwise a pass-through."""

    def __init__(self, app: Any, settings: Settings | None = None) -> None:
        self.app = app
        self.enabled = (settings or Settings.from_env()).fault_injection in ("1", "true", "on")
        if self.enabled:
            logger.warning("fault injection is ON (SHARDBENTO_FAULT_INJECTION): for tests only")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not self.enabled or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        values = [
            v.decode(errors="replace") for k, v in scope.get("headers", []) if k.lower() == FAULT_HEADER
        ]
        token = REQUESTED_FAULT.set(values[0] if values and values[0] in FAULT_KINDS else None)
        try:
            await self.app(scope, receive, send)
        finally:
            REQUESTED_FAULT.reset(token)
