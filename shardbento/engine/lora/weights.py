"""A PEFT LoRA adapter's tensors, read and checked against the loaded base model's linear layers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shardbento.lora import ADAPTER_WEIGHTS, UNSUPPORTED_TARGETS, AdapterError, read_adapter_config

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter on the host: for each targeted module, A [rank, in] and B [out, rank] with PEFT's
    scaling folded into B (float32, full, unsharded)."""

    name: str
    rank: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]


def linear_modules(model: Any) -> dict[str, Any]:
    """The base model's linear layers an adapter may target (bitsandbytes' quantized ones included:
    they subclass nn.Linear); the vocabulary's projections are not among them."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in UNSUPPORTED_TARGETS
    }


def read_adapter(name: str, path: Path, linears: dict[str, Any], max_rank: int) -> AdapterWeights:
    """The adapter at `path`, refused by name when it does not fit the base model: a module it targets
    is missing or not a linear layer, a shape differs, or its rank is over `max_rank`."""
    config = read_adapter_config(name, path)
    if config.rank > max_rank:
        raise AdapterError(name, f"rank {config.rank} is over max_lora_rank {max_rank}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _tensors(name, path).items():
        module, part = _split_key(name, key)
        pairs.setdefault(module, {})[part] = tensor
    if not pairs:
        raise AdapterError(name, f"{path} holds no LoRA weights")
    modules = {}
    for module_name, parts in sorted(pairs.items()):
        if set(parts) != {"A", "B"}:
            raise AdapterError(name, f"{module_name} has lora_{'A' if 'A' not in parts else 'B'} missing")
        modules[module_name] = _checked(name, module_name, parts["A"], parts["B"], linears, config.rank)
        a, b = modules[module_name]
        modules[module_name] = (a, b * config.scaling)
    return AdapterWeights(name=name, rank=config.rank, modules=modules)


def _tensors(name: str, path: Path) -> dict[str, torch.Tensor]:
    file = path / ADAPTER_WEIGHTS
    if file.is_file():
        from safetensors.torch import load_file

        return load_file(str(file))
    legacy = path / "adapter_model.bin"
    if legacy.is_file():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise AdapterError(name, f"no {ADAPTER_WEIGHTS} (or adapter_model.bin) in {path}")


def _split_key(name: str, key: str) -> tuple[str, str]:
    """'base_model.model.<module>.lora_A[.<adapter>].weight' -> (module, 'A')."""
    for part in ("A", "B"):
        marker = f".lora_{part}."
        if marker in key:
            module = key.split(marker)[0].removeprefix(PEFT_PREFIX)
            return module, part
    raise AdapterError(name, f"tensor {key!r} is not a LoRA A or B weight (lora_embedding, a bias?)")


def _checked(
    name: str, module: str, a: torch.Tensor, b: torch.Tensor, linears: dict[str, Any], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if module.rsplit(".", 1)[-1] in UNSUPPORTED_TARGETS:
        raise AdapterError(name, f"it targets {module}, which the batch shares; only decoder linears can")
    linear = linears.get(module)
    if linear is None:
        raise AdapterError(name, f"it targets {module}, which is not a linear layer of the base model")
    expected_a, expected_b = (rank, linear.in_features), (linear.out_features, rank)
    if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
        raise AdapterError(
            name,
            f"{module}: lora_A is {tuple(a.shape)} and lora_B {tuple(b.shape)}; the base layer "
            f"({linear.in_features} -> {linear.out_features}) at rank {rank} needs {expected_a} and {expected_b}",
        )
    return a.float().contiguous(), b.float().contiguous()
