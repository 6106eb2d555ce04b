"""What PEFT itself answers: greedy tokens of the base model with a tiny adapter merged in (the reference
the engines' LoRA answers must equal), and the catalog entry's adapters by name."""

from __future__ import annotations

import functools
from typing import Any

# tiny-llama-lora's adapters (models/tiny-llama-lora.yaml) and the recipes they are generated from
ADAPTER_RECIPES = {
    "tiny-a": "tiny-llama-lora-a",
    "tiny-b": "tiny-llama-lora-b",
    "tiny-c": "tiny-llama-lora-c",
    "tiny-d": "tiny-llama-lora-d",
}


@functools.cache
def merged_model(recipe: str | None) -> Any:
    """tiny-llama with the adapter `recipe` merged into its weights by PEFT (None: the base model)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from shardbento.tiny.lora import ensure_adapter
    from shardbento.tiny.models import ensure_generated

    model = AutoModelForCausalLM.from_pretrained(ensure_generated("tiny-llama"), dtype=torch.float32)
    if recipe is not None:
        model = PeftModel.from_pretrained(model, ensure_adapter(recipe)).merge_and_unload()
    return model.eval()


def peft_greedy(recipe: str | None, prompt_ids: tuple[int, ...] | list[int], max_tokens: int) -> list[int]:
    """The merged model's greedy tokens (EOS ignored: exactly `max_tokens` of them)."""
    import torch

    model = merged_model(recipe)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([list(prompt_ids)]),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()
