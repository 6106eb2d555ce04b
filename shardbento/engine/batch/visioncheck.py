"""The load-time check of the batch's vision paths on the loaded model (Mllama's cross-attention state,
Qwen2-VL's rope delta): a synthetic image prompt and a text prompt decoded together against the model's
own cache path (what generate() runs), so a kernel or a model this was not run on falls back to
one request at a time instead of answering wrong."""

from __future__ import annotations

import logging
from typing import Any

import torch

from shardbento.engine.batch.prefill import PrefillChunk
from shardbento.engine.batch.selfcheck import Agreement, agreement, checked_on

logger = logging.getLogger(__name__)

CHECKED_VISION_TYPES = frozenset({"mllama", "qwen2_vl", "qwen2_5_vl"})
_TEXT = (5, 9, 11, 13, 17)


def synthetic_image_prompt(config: Any) -> dict[str, torch.Tensor]:
    """Processor-shaped inputs of a one-image prompt (seeded pixels), built from the config alone (a
    follower rank has no processor)."""
    generator = torch.Generator().manual_seed(0)
    if config.model_type == "mllama":
        vision = config.vision_config
        tiles, size = vision.max_num_tiles, vision.image_size
        ids = [5, config.image_token_index, 7, 8, 9, 10]
        cross = torch.zeros((1, len(ids), 1, tiles), dtype=torch.long)
        cross[0, 1:, 0, 0] = 1  # the tokens after the image attend to its one tile
        return {
            "input_ids": torch.tensor([ids]),
            "attention_mask": torch.ones((1, len(ids)), dtype=torch.long),
            "pixel_values": torch.rand((1, 1, tiles, 3, size, size), generator=generator) * 2 - 1,
            "aspect_ratio_ids": torch.tensor([[1]]),
            "aspect_ratio_mask": torch.tensor([[[1] + [0] * (tiles - 1)]]),
            "cross_attention_mask": cross,
        }
    vision = config.vision_config
    merge = vision.spatial_merge_size
    side = 2 * merge  # 2 x 2 image tokens
    width = 3 * vision.temporal_patch_size * vision.patch_size**2
    ids = [5, config.vision_start_token_id, *[config.image_token_id] * 4, config.vision_end_token_id, 7, 8]
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones((1, len(ids)), dtype=torch.long),
        "mm_token_type_ids": torch.tensor([[int(i == config.image_token_id) for i in ids]]),
        "pixel_values": torch.rand((side * side, width), generator=generator) * 2 - 1,
        "image_grid_thw": torch.tensor([[1, side, side]]),
    }


def batches_vision_right(runner: Any) -> bool:
    """Whether an image row and a text row decoded together by `runner` give the logits the model's own
    cache path gives each alone (prefill, then one decode step). Logged at INFO with the measure."""
    model = runner.model

    def compare() -> list[Agreement]:
        image = synthetic_image_prompt(model.config)
        image = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in image.items()}
        alone = [_own_cache(model, {"input_ids": torch.tensor([_TEXT])}), _own_cache(model, image)]
        firsts = [int(logits[0].argmax()) for logits, _ in alone]
        runner.prefill([PrefillChunk(-1, _TEXT, 0, 0)])
        prompt = tuple(int(i) for i in image["input_ids"][0])
        prefilled = runner.prefill([PrefillChunk(-2, prompt, 0, 1, image)])
        decoded = runner.decode(firsts)
        return [
            agreement(prefilled[0], alone[1][0][0]),
            agreement(decoded[0], alone[0][1][0]),
            agreement(decoded[1], alone[1][1][0]),
        ]

    return checked_on(  # an unexpected model fails it: one request at a time
        runner,
        compare,
        "image requests in the batch: %s (an image row beside a text row against each alone through the "
        "model's own cache on this model: %s)",
        ("yes", "no, one request at a time through generate()"),
    )


def _own_cache(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's last logits and the next step's, through a transformers cache as generate() runs
    them (greedy next token; Mllama's next mask row repeats the last)."""
    from transformers import DynamicCache

    from shardbento.engine.hf.placement import input_device

    device = input_device(model)
    moved = {k: v.to(device) for k, v in inputs.items()}
    cache = DynamicCache(config=model.config)
    first = model(**moved, past_key_values=cache, use_cache=True).logits[:, -1]
    step: dict[str, Any] = {"input_ids": first.argmax(-1, keepdim=True).to(device)}
    length = moved["input_ids"].shape[1]
    if "cross_attention_mask" in moved:
        step["cross_attention_mask"] = moved["cross_attention_mask"][:, -1:]
    if "mm_token_type_ids" in moved:  # the prefill left the rope delta in the model: text positions past it
        delta = model.model.rope_deltas.to(device)
        step["position_ids"] = (torch.tensor([[length]], device=device) + delta).expand(3, 1, 1)
    else:
        step["position_ids"] = torch.tensor([[length]], device=device)
    second = model(**step, past_key_values=cache, use_cache=True).logits[:, -1]
    return first, second
