"""Where weights go: the Plan's layout as a device map, and the device inputs must be sent to."""

from __future__ import annotations

import logging
from typing import Any

import torch

from shardbento.catalog import ModelSpec
from shardbento.plan.sharding import Plan
from shardbento.plan.source import config_path, is_thudm_spec
from shardbento.plan.split import device_map_from_shares

logger = logging.getLogger(__name__)


def meta_model(spec: ModelSpec, model_path: str, dtype: torch.dtype) -> Any:
    """The checkpoint's architecture on the meta device: its module names, no weight read or allocated."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    import shardbento.engine.hf.glm4v  # noqa: F401 - registers GLM-4V's converted model type

    common = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    config = AutoConfig.from_pretrained(model_path, **common)
    auto_class = AutoModelForImageTextToText if spec.kind == "vision" else AutoModelForCausalLM
    with init_empty_weights():
        return auto_class.from_config(config, dtype=dtype, trust_remote_code=spec.trust_remote_code)


def device_map_for(spec: ModelSpec, plan: Plan, model_path: str, dtype: torch.dtype) -> str | dict[str, Any]:
    """The `device_map` passed to from_pretrained: the spec's own, CPU, one GPU, or the plan's split.

    Preflight already checked that the GPUs the plan uses are visible.
    """
    if spec.device_map is not None:
        return manual_device_map(spec)
    if plan.device == "cpu":
        return "cpu"
    if plan.world_size == 1:
        return {"": 0}
    if not plan.shares:  # no config.json was there to plan from: accelerate balances the layers itself
        logger.warning("model %s: no planned layer split; device_map=auto", spec.name)
        return "auto"
    device_map = device_map_from_shares(plan.shares, meta_model(spec, model_path, dtype))
    logger.info("layer split over %d GPUs as planned: %s", plan.world_size, device_map)
    return device_map


def manual_device_map(spec: ModelSpec) -> dict[str, Any]:
    """The spec's own device_map; for a THUDM checkpoint, its ChatGLM module names as the native ones
    (preflight already refused a key that names no module)."""
    if not is_thudm_spec(spec):
        return dict(spec.device_map or {})
    from shardbento.plan.memory import load_config
    from shardbento.thudm.layout import translate_device_map

    config = load_config(config_path(spec))
    return translate_device_map(dict(spec.device_map or {}), config["num_layers"])


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
