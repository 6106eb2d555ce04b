"""Whether transformers ships a tensor-parallel plan for a config's architecture (no weights, no model)."""

from __future__ import annotations

from typing import Any


def tp_plan_available(config: dict[str, Any]) -> bool:
    """Whether transformers ships a tensor-parallel plan for this architecture's text model."""
    from shardbento.thudm.layout import glm_config, is_thudm

    try:
        if is_thudm(config):  # what the native loader makes of it; GLM-4V shards its GLM, not its tower
            vision = ("vision_config", "boi_token_id", "eoi_token_id")
            config = {k: v for k, v in glm_config(config).items() if k not in vision} | {"model_type": "glm"}
        from transformers import AutoConfig

        fields = {k: v for k, v in config.items() if not k.startswith("_") and k != "auto_map"}
        model_config = AutoConfig.for_model(**fields)
    except (ImportError, ValueError, KeyError, TypeError):  # CheckpointError is a ValueError
        return False
    return bool(getattr(model_config.get_text_config(), "base_model_tp_plan", None))
