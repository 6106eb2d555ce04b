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
    """The device of the input embeddings: where input ids (and position ids, masks) must go under any
    device map. An offloaded embedding's weight is on `meta`; its hook knows where it runs."""
    device = module_device(model, model.get_input_embeddings())
    if device is None:
        raise ValueError("the input embeddings have no device: neither placed, mapped nor hooked")
    return device


def hidden_states_device(model: Any) -> torch.device:
    """The device of the decoder's final hidden states: where the index tensor of `logits_to_keep` must
    be (transformers slices the hidden states before lm_head's own hook moves them). Under a layer split
    that is the last layer's GPU, not the input embeddings' one; a tied lm_head may sit elsewhere again."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    final = None
    if decoder is not None:
        final = getattr(decoder, "norm", None) or _last_child_with_parameters(decoder)
    for module in (final, model.get_output_embeddings()):
        device = module_device(model, module) if module is not None else None
        if device is not None:
            return device
    return input_device(model)


def device_ints(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """Equal-length lists of ints as one int64 tensor [rows, n] on `device`, in one host-to-device copy
    (from pinned memory, not waiting for the device, on CUDA): a step's ids, positions and lengths."""
    host = torch.tensor(rows, dtype=torch.long)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def module_device(model: Any, module: Any) -> torch.device | None:
    """Where `module` computes: accelerate's hook (an offloaded module's weights are on `meta` and run
    on its execution device), else the model's device map, else its first parameter (never `meta`)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return _as_device(hook.execution_device)
    device_map = getattr(model, "hf_device_map", None) or {}
    if device_map:
        for name, candidate in model.named_modules():
            if candidate is module:
                placed = _mapped_device(device_map, name)
                if placed is not None:
                    return placed
                break
    weight = next(module.parameters(), None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    return None


def _last_child_with_parameters(module: Any) -> Any:
    children = [child for child in module.children() if next(child.parameters(), None) is not None]
    return children[-1] if children else None


def _as_device(placed: Any) -> torch.device:
    return torch.device("cuda", placed) if isinstance(placed, int) else torch.device(placed)


def _mapped_device(device_map: dict[str, Any], module_name: str) -> torch.device | None:
    """The device a device map gives a module (the longest matching prefix wins)."""
    matches = [k for k in device_map if k == "" or module_name == k or module_name.startswith(k + ".")]
    if not matches:
        return None
    placed = device_map[max(matches, key=len)]
    if placed in ("disk", "meta"):
        return None
    return _as_device(placed)
