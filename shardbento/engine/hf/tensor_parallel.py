"""A tensor-parallel rank's shard: loaded with transformers' plan (or this package's, for a model
transformers has none for), the attention modules' head counts made this rank's, and its local shapes
checked against them before serving."""

from __future__ import annotations

import logging
from typing import Any

from shardbento.catalog import ModelSpec
from shardbento.plan.tp_plan import PACKAGE_HEAD_TP_PLANS, package_tp_plan

logger = logging.getLogger(__name__)

# Attention modules' head counts, with the projection whose output rows hold those heads.
_HEAD_COUNTS = (("num_heads", "q_proj"), ("num_key_value_heads", "k_proj"), ("num_key_value_heads", "v_proj"))


def load_shard(spec: ModelSpec, path: str, world_size: int, dtype: Any) -> Any:
    """This rank's shard of the model (the process group is up): the vision tower whole, the language
    model split by the plan."""
    from transformers import AutoConfig, DistributedConfig

    import shardbento.engine.hf.glm4v  # noqa: F401 - registers GLM-4V's converted model type
    from shardbento.engine.hf.loading import model_class

    common = {"trust_remote_code": spec.trust_remote_code}
    config = AutoConfig.from_pretrained(path, **common)
    plan = package_tp_plan(getattr(config, "model_type", None))
    distributed = DistributedConfig(tp_size=world_size)
    if plan is not None:  # read by the text model as transformers' own base_model_tp_plan would be
        config.get_text_config().base_model_tp_plan = dict(plan)
        distributed = DistributedConfig(tp_size=world_size, tp_plan=PACKAGE_HEAD_TP_PLANS[config.model_type])
    model = model_class(spec.kind).from_pretrained(
        path, config=config, dtype=dtype, distributed_config=distributed, **common
    )
    model.eval()
    logger.info("tensor-parallel shard: %s", localize_heads(model, world_size))
    return model


def local_rows(weight: Any) -> int:
    """A projection's output rows on this rank (a DTensor's local shard)."""
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    return int(local.shape[0])


def localize_heads(model: Any, world_size: int) -> str:
    """Attention modules whose projections the plan split count this rank's heads (Mllama's reshape by
    its module's head counts); every split module's local projection rows must then equal its heads x
    head_dim. Returns what this rank holds, for the log."""
    split = []
    for name, module in model.named_modules():
        head_dim = getattr(module, "head_dim", None)
        if head_dim is None or not hasattr(module, "q_proj") or not hasattr(module, "k_proj"):
            continue
        if local_rows(module.q_proj.weight) == module.q_proj.weight.shape[0]:
            continue  # not split (the vision tower's): every rank computes it in full
        heads = {}
        for attr, proj in _HEAD_COUNTS:
            rows = local_rows(getattr(module, proj).weight)
            total = getattr(module, attr, None)
            if total is not None and total * head_dim != rows:
                if rows * world_size != total * head_dim:
                    raise RuntimeError(
                        f"{name}.{proj} holds {rows} rows on this rank: not 1/{world_size} of "
                        f"{total} heads x {head_dim}"
                    )
                setattr(module, attr, total // world_size)
            heads[proj] = rows // head_dim
        split.append((name, heads))
    if not split:
        raise RuntimeError(f"no attention module was split over the {world_size} ranks")
    q, k = split[0][1]["q_proj"], split[0][1]["k_proj"]
    return (
        f"{len(split)} attention modules split over {world_size} ranks ({q} query and {k} KV heads "
        f"each here); vision tower whole here: {vision_parameters(model) / 1e6:.2f} M parameters"
    )


def vision_parameters(model: Any) -> int:
    """The vision tower's parameters this rank holds, each checked to be whole (never split: each rank
    encodes the images itself)."""
    total = 0
    for name, param in model.named_parameters():
        if "vision" in name or "visual" in name:
            local = param.to_local() if hasattr(param, "to_local") else param
            if local.shape != param.shape:
                raise RuntimeError(f"{name} is split over the ranks; the vision tower must stay whole")
            total += param.numel()
    return total
