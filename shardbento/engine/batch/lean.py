"""The lean decode forward: a decode step of a Llama-shaped text model with the modeling code's wrappers
taken out.

A decode step through transformers' `model(...)` runs, per layer, a dozen module calls, each through
`nn.Module.__call__`, plus the decorators and keyword plumbing of the causal-LM, model, layer and
attention forwards. None of it computes anything a decode step needs: on a CPU that Python costs as much
as a third of a small model's step. `LeanDecode` runs the same modules' own `forward`s in the same order
with the same tensors (the norms, the projections (packed, LoRA-wrapped: whatever their forward is by
then), the rotary embedding, the KV pool's `update`, transformers' SDPA attention), so the logits are
the plain path's to the bit. The runner serves with it only after `selfcheck.decodes_lean` compared the
two on the loaded model; anything this module does not recognise keeps the plain forward.
"""

from __future__ import annotations

from typing import Any

import torch

from shardbento.engine.batch import packed

# The causal LMs whose decoder layer is Llama's: pre-norm attention and gated MLP, rotary q/k (Qwen3:
# normed per head first), the model's own RMSNorms, no scaling of the embeddings or the logits.
LEAN_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


def why_not_lean(model: Any) -> str | None:
    """Why the lean forward cannot run this model (None: it can; the load-time check still decides)."""
    name = type(model).__name__
    if name not in LEAN_ARCHITECTURES:
        return f"{name} is not one of {', '.join(LEAN_ARCHITECTURES)}"
    config = model.config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", packed.ATTENTION):
        return f"attention {getattr(config, '_attn_implementation', None)!r} is not SDPA"
    if packed.windowed(config):
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, part) for part in ("embed_tokens", "rotary_emb", "norm")):
        return "the model has no embed_tokens, rotary_emb and norm"
    for layer in inner.layers:
        if not all(hasattr(layer, part) for part in _LAYER_PARTS):
            return f"{type(layer).__name__} lacks one of {', '.join(_LAYER_PARTS)}"
        if not all(hasattr(layer.self_attn, part) for part in _ATTENTION_PARTS):
            return f"{type(layer.self_attn).__name__} lacks one of {', '.join(_ATTENTION_PARTS)}"
        if not all(hasattr(layer.mlp, part) for part in _MLP_PARTS):
            return f"{type(layer.mlp).__name__} lacks one of {', '.join(_MLP_PARTS)}"
    modules = torch.nn.modules.module
    if modules._global_forward_hooks or modules._global_forward_pre_hooks:
        return "global module forward hooks"
    hooked = [n or type(model).__name__ for n, m in model.named_modules() if _hooked(m)]
    if hooked:  # an accelerate layer split's, a user's: hooks run in __call__ only
        return f"forward hooks on {hooked[0]}" + (
            f" and {len(hooked) - 1} more modules" if len(hooked) > 1 else ""
        )
    return None


def _hooked(module: torch.nn.Module) -> bool:
    # hooks registered with_kwargs=True sit in these same dicts (the *_with_kwargs ones only mark them)
    return bool(module._forward_hooks or module._forward_pre_hooks)


class LeanDecode:
    """One decode step of a model that `why_not_lean` accepts: logits of each row's new token."""

    def __init__(self, model: Any) -> None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.model = model
        self._inner = model.model
        self._layers = list(self._inner.layers[: model.config.num_hidden_layers])
        self._attention = sdpa_attention_forward
        self._rotary = apply_rotary_pos_emb

    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """`ids` and `positions` [rows, 1], `mask` [rows, 1, 1, kv_len] (True: attend), `cache` the
        runner's KV pool readied for this step; logits [rows, vocab]."""
        inner, rows = self._inner, ids.shape[0]
        hidden = inner.embed_tokens.forward(ids)
        cos, sin = inner.rotary_emb(hidden, positions)
        for layer in self._layers:
            attn = layer.self_attn
            shape = (rows, 1, -1, attn.head_dim)
            x = layer.input_layernorm.forward(hidden)
            query, key = attn.q_proj.forward(x).view(shape), attn.k_proj.forward(x).view(shape)
            if hasattr(attn, "q_norm"):  # Qwen3: each head normed before the rotation
                query, key = attn.q_norm.forward(query), attn.k_norm.forward(key)
            value = attn.v_proj.forward(x).view(shape).transpose(1, 2)
            query, key = self._rotary(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
            key, value = cache.update(key, value, attn.layer_idx)
            out, _ = self._attention(attn, query, key, value, mask, dropout=0.0, scaling=attn.scaling)
            hidden = hidden + attn.o_proj.forward(out.reshape(rows, 1, -1).contiguous())
            mlp = layer.mlp
            x = layer.post_attention_layernorm.forward(hidden)
            x = mlp.down_proj.forward(mlp.act_fn.forward(mlp.gate_proj.forward(x)) * mlp.up_proj.forward(x))
            hidden = hidden + x
        return self.model.lm_head.forward(inner.norm.forward(hidden))[:, -1]
