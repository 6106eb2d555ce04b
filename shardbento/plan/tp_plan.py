"""Whether a tensor-parallel plan exists for a config's architecture (transformers' own, or one this
package ships for a model transformers has none for), decided without weights, torch or a model."""

from __future__ import annotations

from typing import Any

# Mllama's language model (transformers 5.23 ships no plan for it), keyed as transformers keys a text
# model's `base_model_tp_plan`: the self- and cross-attention q/k/v split by heads (colwise) and their
# output projection rowwise (one all-reduce per attention), the MLP colwise then rowwise (one
# all-reduce); norms, the cross-attention gates and the vision tower stay whole on every rank (each rank
# encodes the image itself: nothing crosses ranks for it). Mllama's attention modules count their heads,
# so the loader divides those counts by the ranks after loading (engine/hf/tensor_parallel.py).
MLLAMA_TEXT_TP_PLAN: dict[str, str] = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.cross_attn.q_proj": "colwise",
    "layers.*.cross_attn.k_proj": "colwise",
    "layers.*.cross_attn.v_proj": "colwise",
    "layers.*.cross_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
}
# Plans for the language model of architectures transformers has none for, by config.json's model_type.
PACKAGE_TEXT_TP_PLANS: dict[str, dict[str, str]] = {"mllama": MLLAMA_TEXT_TP_PLAN}
# The output head's split for those (transformers' Llama-family choice: each rank computes its columns
# of the logits, then they are gathered).
PACKAGE_HEAD_TP_PLANS: dict[str, dict[str, str]] = {"mllama": {"lm_head": "colwise_gather_output"}}


def package_tp_plan(model_type: str | None) -> dict[str, str] | None:
    """This package's text-model plan for `model_type`, or None where transformers' own applies."""
    return PACKAGE_TEXT_TP_PLANS.get(model_type or "")


def tp_plan_available(config: dict[str, Any]) -> bool:
    """Whether transformers, or this package for a model transformers has none for, has a
    tensor-parallel plan for this architecture's text model."""
    if package_tp_plan(config.get("model_type")) is not None:
        return True
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
