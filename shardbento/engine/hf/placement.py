"""Where weights go: the device map for 0, 1 or N GPUs, and the device inputs must be sent to."""

from __future__ import annotations

import logging
from typing import Any

import torch

from shardbento.catalog import ModelSpec

logger = logging.getLogger(__name__)

# Kept free on every GPU for activations, the KV cache and the CUDA context.
HEADROOM_FRACTION = 0.15


class PlacementError(RuntimeError):
    """The spec cannot be placed on the devices this process sees; the message has the fix."""


def check_visible_gpus(spec: ModelSpec) -> None:
    """Fail before loading weights when the GPUs the spec declares are not visible."""
    if spec.gpus == 0:
        return
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < spec.gpus:
        raise PlacementError(
            f"model {spec.name!r} declares gpus: {spec.gpus} but this process sees {visible} GPU(s) "
            "(check CUDA_VISIBLE_DEVICES and the GPUs BentoML allocated); "
            f"set gpus: {visible} in models/{spec.name}.yaml if the model fits, or run on a larger machine"
        )


def balanced_max_memory(num_gpus: int, total_bytes: list[int]) -> dict[int | str, int]:
    """Per-GPU budgets that leave HEADROOM_FRACTION of each GPU free."""
    return {i: int(total_bytes[i] * (1 - HEADROOM_FRACTION)) for i in range(num_gpus)}


def plan_layer_split(model_path: str, dtype: torch.dtype, max_memory: dict[int | str, int], **kwargs: Any):
    """accelerate's layer split for a model built on the meta device: no weight is read."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_path, **kwargs)
    auto_class = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    with init_empty_weights():
        model = auto_class.from_config(config, dtype=dtype, trust_remote_code=kwargs.get("trust_remote_code"))
    no_split = getattr(model, "_no_split_modules", None) or []
    balanced = get_balanced_memory(
        model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype
    )
    return infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype)


def device_map_for(spec: ModelSpec, model_path: str, dtype: torch.dtype) -> str | dict[str, Any]:
    """The `device_map` passed to from_pretrained: the spec's own, CPU, one GPU, or a planned split."""
    if spec.device_map is not None:
        return dict(spec.device_map)
    if spec.gpus == 0:
        return "cpu"
    check_visible_gpus(spec)
    if spec.gpus == 1:
        return {"": 0}
    totals = [torch.cuda.get_device_properties(i).total_memory for i in range(spec.gpus)]
    plan = plan_layer_split(
        model_path,
        dtype,
        balanced_max_memory(spec.gpus, totals),
        revision=spec.revision,
        trust_remote_code=spec.trust_remote_code,
    )
    logger.info("layer split over %d GPUs: %s", spec.gpus, plan)
    return plan


def input_device(model: Any) -> torch.device:
    """The device of the input embeddings: where input ids must go under any device map.

    accelerate's hook knows the execution device of an offloaded embedding (CPU- or disk-offloaded
    weights run on the main GPU); otherwise the device map, then the weight itself, tell.
    """
    embeddings = model.get_input_embeddings()
    hook = getattr(embeddings, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    device_map = getattr(model, "hf_device_map", None) or {}
    for name, module in model.named_modules():
        if module is embeddings:
            placed = _mapped_device(device_map, name)
            if placed is not None:
                return placed
            break
    return embeddings.weight.device


def _mapped_device(device_map: dict[str, Any], module_name: str) -> torch.device | None:
    """The device a device map gives a module (the longest matching prefix wins)."""
    matches = [k for k in device_map if k == "" or module_name == k or module_name.startswith(k + ".")]
    if not matches:
        return None
    placed = device_map[max(matches, key=len)]
    if isinstance(placed, int):
        return torch.device("cuda", placed)
    if placed in ("disk", "meta"):
        return None
    return torch.device(placed)
