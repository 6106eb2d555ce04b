"""Server limits and security settings, read once at startup from SHARDBENTO_* environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

MIB = 1024 * 1024


class SettingsError(ValueError):
    """An environment variable holds a value the server cannot use; the message names it."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Every limit has a documented default (docs/operations.md, "Limits"); 0 never means unlimited.

    The environment variable of a field is SHARDBENTO_ + the field name in capitals, e.g.
    SHARDBENTO_MAX_BODY_BYTES. The API key is never part of repr() so it cannot reach a log line.
    """

    api_key: str | None = None
    auth_metrics: bool = False
    max_body_bytes: int = 32 * MIB
    max_messages: int = 256
    max_prompt_tokens: int | None = None  # None: the model's context length
    max_images: int | None = None  # None: the catalog entry's max_images
    max_image_bytes: int = 10 * MIB
    max_image_pixels: int = 40_000_000
    max_stop_strings: int = 8
    max_stop_length: int = 256
    max_schema_bytes: int = 64 * 1024  # a response_format schema or a tool's parameters, as compact JSON
    max_n: int = 8  # choices one request may ask for
    request_timeout_s: float = 300.0
    fault_injection: str | None = None  # test-only: see shardbento/api/middleware/faults.py
    engine_fault: str | None = None  # test-only: "METHOD@N", rank 0's N-th runner METHOD call fails
    collective_timeout_s: float = 600.0  # a tensor-parallel collective waiting for a peer fails after this
    allow_runtime_lora_updating: bool = False  # POST /v1/load_lora_adapter and unload (vLLM's switch)
    force_generate: bool = False  # benchmark knob: every request alone through generate(), no batch

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "api_key"}
        return f"Settings(api_key={'set' if self.api_key else 'unset'}, {shown})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Parse SHARDBENTO_* variables; an unparsable or out-of-range value fails with its name."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for item in fields(cls):
            name = f"SHARDBENTO_{item.name.upper()}"
            raw = environ.get(name)
            if raw is None or raw.strip() == "":
                continue
            values[item.name] = _parse(name, raw.strip(), str(item.type))
        return cls(**values)  # type: ignore[arg-type]


def _parse(name: str, raw: str, type_name: str) -> object:
    if type_name.startswith("bool"):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name}={raw!r}: expected true or false")
    if type_name.startswith("str"):
        return raw
    number_type = float if type_name.startswith("float") else int
    try:
        value = number_type(raw)
    except ValueError:
        kind = "a number" if number_type is float else "an integer"
        raise SettingsError(f"{name}={raw!r}: expected {kind}") from None
    if value <= 0:
        raise SettingsError(f"{name}={raw!r}: must be greater than 0")
    return value
