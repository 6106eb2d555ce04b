"""What a vision prompt's prefill needs beside its processor outputs: Qwen2-VL's multimodal rotary
positions (and the offset its decode keeps), Mllama's last image-mask row (what its decode tokens attend
to), and a preempted prompt's inputs grown by the tokens it had generated."""

from __future__ import annotations

from typing import Any

import torch

# Per-token processor outputs a preempted prompt's generated tokens extend, and how: attended (1), text
# (0), or attending to the images the last prompt token attends to (generate() grows Mllama's mask so).
_EXTEND = {"attention_mask": "ones", "mm_token_type_ids": "zeros", "token_type_ids": "zeros"}
_REPEAT_LAST = frozenset({"cross_attention_mask"})


def rope_positions(model: Any, inputs: dict[str, Any]) -> tuple[dict[str, torch.Tensor], int | None]:
    """A Qwen2-VL prompt's 3D rotary positions for its prefill and its decode offset (transformers'
    rope delta: after the images every position is the token's index plus it); ({}, None) for others."""
    rope_index = getattr(getattr(model, "model", None), "get_rope_index", None)
    if rope_index is None or "mm_token_type_ids" not in inputs:
        return {}, None
    positions, deltas = rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"),
        attention_mask=inputs.get("attention_mask"),
    )
    return {"position_ids": positions}, int(deltas.reshape(-1)[0])


def image_mask_row(inputs: dict[str, Any]) -> torch.Tensor | None:
    """Mllama's cross-attention mask row of the prompt's last token ([images, tiles]), on the host."""
    mask = inputs.get("cross_attention_mask")
    return None if mask is None else mask[0, -1].cpu()


def with_generated(inputs: dict[str, Any], generated: list[int]) -> dict[str, Any]:
    """A vision prompt's processor outputs with a preempted sequence's generated tokens appended: its ids,
    and every per-token output grown as generate() grows it."""
    if not generated:
        return inputs
    ids = inputs["input_ids"]
    extra = torch.tensor([generated], dtype=ids.dtype)
    resumed = dict(inputs, input_ids=torch.cat([ids, extra], dim=-1))
    for name, how in _EXTEND.items():
        if name in inputs:
            value = inputs[name]
            grown = torch.ones_like(extra) if how == "ones" else torch.zeros_like(extra)
            resumed[name] = torch.cat([value, grown.to(value.dtype)], dim=-1)
    for name in _REPEAT_LAST & inputs.keys():
        value = inputs[name]
        last = value[:, -1:].expand(-1, len(generated), *value.shape[2:])
        resumed[name] = torch.cat([value, last], dim=1)
    return resumed
