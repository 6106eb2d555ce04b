"""The model built on the meta device from its config.json: exact parameter counts, accelerate's split."""

from __future__ import annotations

import re
from typing import Any

from shardbento.plan.memory import GpuShare

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")


def meta_model(config: dict[str, Any], dtype: str = "bfloat16") -> Any:
    """The architecture with no weights allocated; raises for remote-code models (not available offline)."""
    import torch
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if not k.startswith("_") and k != "auto_map"}
    model_config = AutoConfig.for_model(**fields)
    architecture = getattr(transformers, config["architectures"][0])
    with init_empty_weights():
        return architecture._from_config(model_config, dtype=getattr(torch, dtype))


def tp_plan_available(config: dict[str, Any]) -> bool:
    """Whether transformers ships a tensor-parallel plan for this architecture's text model."""
    try:
        from transformers import AutoConfig

        fields = {k: v for k, v in config.items() if not k.startswith("_") and k != "auto_map"}
        model_config = AutoConfig.for_model(**fields)
    except (ImportError, ValueError, KeyError, TypeError):
        return False
    return bool(getattr(model_config.get_text_config(), "base_model_tp_plan", None))


def accelerate_split(model: Any, max_memory: list[int], dtype: str = "bfloat16") -> list[GpuShare]:
    """accelerate.infer_auto_device_map on fake GPUs, summarised like planner.split_layers."""
    import torch
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    device_map = infer_auto_device_map(
        model,
        max_memory=dict(enumerate(max_memory)),
        no_split_module_classes=list(model._no_split_modules or []),
        dtype=getattr(torch, dtype),
    )
    sizes = compute_module_sizes(model, dtype=getattr(torch, dtype))
    shares = []
    for gpu in range(len(max_memory)):
        names = [name for name, placed in device_map.items() if placed == gpu]
        layers = [int(m[1]) for name in names if (m := _LAYER.search(name))]
        shares.append(
            GpuShare(
                gpu=gpu,
                first_layer=min(layers) if layers else None,
                last_layer=max(layers) if layers else None,
                other=tuple(name for name in names if not _LAYER.search(name)),
                weight_bytes=sum(sizes[name] for name in names),
            )
        )
    return shares
