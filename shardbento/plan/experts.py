"""A mixture of experts as config.json describes it: which layers route, and what each holds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Experts:
    """A mixture-of-experts MLP: routed experts (gate, up, down each), shared experts beside them, a
    router (with a per-expert score bias where the config routes by sigmoid with one), on every layer
    from `first_sparse` on, `every` layers apart, except `dense_layers`."""

    num_experts: int
    expert_size: int
    shared_size: int  # the shared experts' intermediate size together (0: none)
    router_bias: bool
    first_sparse: int = 0
    every: int = 1
    dense_layers: tuple[int, ...] = ()

    def sparse(self, layer: int) -> bool:
        return layer >= self.first_sparse and (layer + 1) % self.every == 0 and layer not in self.dense_layers

    def params(self, hidden: int) -> int:
        shared = 3 * hidden * self.shared_size
        return (
            self.routed_params(hidden)
            + shared
            + self.num_experts * hidden
            + (self.num_experts if self.router_bias else 0)
        )

    def routed_params(self, hidden: int) -> int:
        """The routed experts' projections of one layer (3-D tensors in transformers, not nn.Linear)."""
        return self.num_experts * 3 * hidden * self.expert_size


def experts_of(text: dict[str, Any]) -> Experts | None:
    """The config's experts, in the field names GLM-4.5 and DeepSeek (n_routed_experts), Qwen-MoE
    (num_experts) and Mixtral (num_local_experts) use; None for a dense model."""
    count = text.get("n_routed_experts") or text.get("num_experts") or text.get("num_local_experts")
    if not count:
        return None
    size = text.get("moe_intermediate_size") or text["intermediate_size"]
    shared = (text.get("n_shared_experts") or 0) * size or text.get("shared_expert_intermediate_size") or 0
    return Experts(
        num_experts=count,
        expert_size=size,
        shared_size=shared,
        router_bias=text.get("model_type") in ("glm4_moe", "deepseek_v3") or "topk_method" in text,
        first_sparse=text.get("first_k_dense_replace") or 0,
        every=text.get("decoder_sparse_step") or 1,
        dense_layers=tuple(text.get("mlp_only_layers") or ()),
    )
