"""Seeded tiny LoRA adapters of the tiny models, written by PEFT itself (its own file layout), cached."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from shardbento.cachedir import build_once, cache_root

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class LoraRecipe:
    """Everything that determines an adapter's bytes. B is filled too (PEFT starts it at zero), so the
    adapter changes the base model's answers."""

    base: str
    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    use_rslora: bool = False
    seed: int = 1
    std: float = 0.1


LORA_RECIPES: dict[str, LoraRecipe] = {
    "tiny-llama-lora-a": LoraRecipe("tiny-llama", seed=1),
    "tiny-llama-lora-b": LoraRecipe("tiny-llama", rank=4, alpha=8, targets=("q_proj", "v_proj"), seed=2),
    "tiny-llama-lora-c": LoraRecipe("tiny-llama", rank=16, alpha=16, use_rslora=True, seed=3, std=0.06),
    "tiny-llama-lora-d": LoraRecipe("tiny-llama", targets=("o_proj", "down_proj", "up_proj"), seed=4),
    "tiny-llama-lora-r64": LoraRecipe("tiny-llama", rank=64, alpha=64, targets=("q_proj",), seed=5),
}


def ensure_adapter(recipe: str, cache_dir: Path | None = None) -> Path:
    """The directory of the generated adapter `recipe`, generated on first use."""
    if recipe not in LORA_RECIPES:
        raise ValueError(f"unknown tiny adapter recipe {recipe!r}; known: {', '.join(sorted(LORA_RECIPES))}")
    spec = LORA_RECIPES[recipe]
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    digest = hashlib.sha256(f"{json.dumps(asdict(spec), sort_keys=True)} {FORMAT_VERSION}".encode())
    final_dir = root / f"{recipe}-{digest.hexdigest()[:10]}"
    return build_once(final_dir, lambda out: _build(spec, out), f"tiny adapter {recipe!r}")


def _build(recipe: LoraRecipe, out_dir: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from shardbento.tiny.models import ensure_generated

    base = AutoModelForCausalLM.from_pretrained(ensure_generated(recipe.base), dtype=torch.float32)
    config = LoraConfig(
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        target_modules=list(recipe.targets),
        use_rslora=recipe.use_rslora,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(recipe.seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * recipe.std)
    model.save_pretrained(out_dir)
