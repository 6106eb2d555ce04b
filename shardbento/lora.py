"""LoRA adapters as the catalog and the API name them: sources, names, PEFT's adapter_config.json (no torch)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
# Modules an adapter may not target: the batch shares them (vocabulary rows, the logits' projection).
UNSUPPORTED_TARGETS = ("lm_head", "embed_tokens", "wte", "output_layer", "embedding")


class AdapterError(ValueError):
    """An adapter that cannot be served; the message names it and says why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"LoRA adapter {name!r}: {reason}")
        self.name = name
        self.reason = reason


class LoraSource(BaseModel):
    """Where a catalog adapter comes from: a hub id (pinned by `revision`) or a local PEFT directory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="Hub id or local path of a PEFT LoRA adapter directory.")
    revision: str = "main"

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"source": value} if isinstance(value, str) else value

    @property
    def is_hub(self) -> bool:
        if self.source.startswith(("/", ".", "~")):
            return False
        return self.source.count("/") == 1 and not Path(self.source).exists()


def check_adapter_name(name: str, base: str | None = None) -> str:
    """A name clients send as `model`: letters, digits and ._:/- (not the base model's own name)."""
    if not NAME_PATTERN.match(name):
        raise ValueError(
            f"adapter name {name!r} must start with a letter or digit and hold only letters, digits "
            "and ._:/- (at most 128 characters)"
        )
    if base is not None and name == base:
        raise ValueError(f"adapter name {name!r} is the base model's own name")
    return name


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    """What the engines read of PEFT's adapter_config.json: rank, scaling and the targeted modules."""

    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str  # names, or one regular expression (PEFT's two forms)
    base_model: str | None

    @property
    def scaling(self) -> float:
        """PEFT's scale of B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def read_adapter_config(name: str, path: Path) -> AdapterConfig:
    """Parse and check a PEFT LoRA adapter's config; what the engines cannot serve is refused by name."""
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise AdapterError(name, f"no {ADAPTER_CONFIG} in {path} (not a PEFT adapter directory)")
    try:
        data = json.loads(file.read_text())
    except ValueError as exc:
        raise AdapterError(name, f"{file} is not valid JSON: {exc}") from None
    if data.get("peft_type", "LORA") != "LORA":
        raise AdapterError(name, f"peft_type is {data.get('peft_type')!r}; only LORA adapters are served")
    refused = {
        "use_dora": "DoRA adapters are not supported",
        "modules_to_save": "modules_to_save (fully trained modules) are not supported",
        "rank_pattern": "per-module ranks (rank_pattern) are not supported",
        "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
        "layers_pattern": "layers_pattern is not supported",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D bases) is not supported",
        "lora_bias": "a LoRA bias (lora_bias) is not supported",
        "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
        "trainable_token_indices": "trainable token embeddings are not supported",
        "layer_replication": "layer_replication is not supported",
    }
    for key, why in refused.items():
        if data.get(key):
            raise AdapterError(name, f"{why} ({key} is set)")
    if data.get("bias", "none") != "none":
        raise AdapterError(name, f"bias is {data['bias']!r}; only bias: none is supported")
    targets = data.get("target_modules") or ()
    rank = data.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterError(name, f"r is {rank!r}; it must be a positive integer")
    return AdapterConfig(
        rank=rank,
        alpha=float(data.get("lora_alpha", rank)),
        use_rslora=bool(data.get("use_rslora", False)),
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        base_model=data.get("base_model_name_or_path"),
    )


def local_adapter_path(name: str, source: LoraSource) -> Path:
    """The adapter's directory: a local path as is, a hub id downloaded (cached) at its revision."""
    if not source.is_hub:
        path = Path(source.source).expanduser()
        if not path.is_dir():
            raise AdapterError(name, f"{source.source} is not a directory")
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source.source, revision=source.revision))
