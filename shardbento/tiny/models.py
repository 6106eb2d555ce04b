"""Deterministic offline generation of tiny random-weight models (and their tokenizers) into a cache."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from shardbento.cachedir import build_once, cache_root
from shardbento.tiny.templates import (
    GLM45_ADDED_TOKENS,
    GLM45_CHAT_TEMPLATE,
    GLM45_EOS_TOKENS,
    GLM45_TEXT_TOKENS,
    QWEN3_CHAT_TEMPLATE,
    QWEN3_TEXT_TOKENS,
)
from shardbento.tiny.thudm import THUDM_RECIPES, build_thudm, thudm_digest
from shardbento.tiny.tokenizer import (
    ENDOFTEXT,
    IM_END,
    IMAGE,
    chat_template,
    corpus_lines,
    make_tokenizer_config_portable,
    train_tokenizer,
)
from shardbento.tiny.vision_models import VISION_RECIPES, build_vision_checkpoint, vision_digest

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# Bump when the generator's output changes for an unchanged recipe (it is part of the directory hash).
FORMAT_VERSION = 3  # 3: GLM-4.5's MTP layer with zero biases, counted in the index's total_size
_INIT_STD = 0.02


@dataclass(frozen=True, slots=True)
class VisionRecipe:
    """A tiny CLIP vision tower."""

    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2


@dataclass(frozen=True, slots=True)
class MoeRecipe:
    """GLM-4.5's mixture of experts, tiny: the first layers dense, then routed experts beside a shared
    one, and the multi-token-prediction layer the hub checkpoint carries after the last layer."""

    moe_intermediate_size: int = 128
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    first_k_dense_replace: int = 1
    num_nextn_predict_layers: int = 1


@dataclass(frozen=True, slots=True)
class Recipe:
    """Everything that determines a generated model's bytes."""

    architecture: Literal["llama", "qwen2", "qwen3", "llava", "glm4_moe"]
    vocab_size: int = 1024
    hidden_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 512
    max_position_embeddings: int = 2048
    max_shard_size: str = "4MB"
    seed: int = 0
    quiet_lm_head: bool = False
    vision: VisionRecipe | None = None
    moe: MoeRecipe | None = None


RECIPES: dict[str, Recipe] = {
    "tiny-llama": Recipe(architecture="llama"),
    "tiny-qwen": Recipe(architecture="qwen2"),
    "tiny-qwen3": Recipe(architecture="qwen3"),  # Qwen3-8B's chat template, <think> and tool tokens
    "tiny-llava": Recipe(architecture="llava", vision=VisionRecipe()),
    # GLM-4.5-Air's layout (config fields, per-expert tensor names, the MTP layer), chat template and tokens
    "tiny-glm45": Recipe(architecture="glm4_moe", moe=MoeRecipe()),
    "bench-llama": Recipe(
        architecture="llama",
        vocab_size=3072,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1408,
        max_shard_size="64MB",
        quiet_lm_head=True,
    ),
}


def ensure_generated(recipe: str, cache_dir: Path | None = None) -> Path:
    """Return the directory of the generated `recipe` model, generating it on first use."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    if recipe in THUDM_RECIPES:
        thudm = THUDM_RECIPES[recipe]
        final_dir = root / f"{recipe}-{thudm_digest(thudm)}"
        return build_once(final_dir, lambda out_dir: build_thudm(thudm, out_dir), f"tiny model {recipe!r}")
    if recipe in VISION_RECIPES:
        vision = VISION_RECIPES[recipe]
        final_dir = root / f"{recipe}-{vision_digest(vision)}"
        build = lambda out_dir: build_vision_checkpoint(vision, out_dir)  # noqa: E731
        return build_once(final_dir, build, f"tiny model {recipe!r}")
    if recipe not in RECIPES:
        known = sorted([*RECIPES, *THUDM_RECIPES, *VISION_RECIPES])
        raise ValueError(f"Unknown tiny-model recipe {recipe!r}; known recipes: {', '.join(known)}.")
    final_dir = root / f"{recipe}-{recipe_digest(RECIPES[recipe])}"
    return build_once(final_dir, lambda out_dir: _build(RECIPES[recipe], out_dir), f"tiny model {recipe!r}")


def recipe_digest(recipe: Recipe) -> str:
    """A short hash of the recipe, the corpus and the format version: any change gives a new directory."""
    hasher = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode())
    hasher.update(f"format={FORMAT_VERSION}".encode())
    hasher.update(_template(recipe).encode())  # saved with the model
    for line in corpus_lines():
        hasher.update(line.encode())
    return hasher.hexdigest()[:10]


def _template(recipe: Recipe) -> str:
    """The chat template the recipe's tokenizer carries: the real model's where it imitates one."""
    real = {"qwen3": QWEN3_CHAT_TEMPLATE, "glm4_moe": GLM45_CHAT_TEMPLATE}.get(recipe.architecture)
    return real or chat_template(recipe.vision is not None)


def _tokenizer(recipe: Recipe) -> PreTrainedTokenizerFast:
    """The trained tokenizer with the added tokens of the model the recipe imitates."""
    common = (recipe.vocab_size, recipe.vision is not None, recipe.max_position_embeddings)
    if recipe.architecture == "glm4_moe":
        added = {"text_tokens": GLM45_TEXT_TOKENS, "added_tokens": GLM45_ADDED_TOKENS}
        return train_tokenizer(*common, template=_template(recipe), eos_token=ENDOFTEXT, **added)
    text_tokens = QWEN3_TEXT_TOKENS if recipe.architecture == "qwen3" else ()
    return train_tokenizer(*common, template=_template(recipe), text_tokens=text_tokens)


def _build(recipe: Recipe, out_dir: Path) -> None:
    """Write tokenizer (or processor), config, generation config and sharded weights into `out_dir`."""
    tokenizer = _tokenizer(recipe)
    model = _build_model(recipe, tokenizer)
    state_dict = _canonical_state_dict(model) if recipe.vision else None
    model.save_pretrained(out_dir, state_dict=state_dict, max_shard_size=recipe.max_shard_size)
    if recipe.architecture == "glm4_moe":
        _glm45_hub_layout(recipe, recipe.moe or MoeRecipe(), model, out_dir)
    if recipe.vision is None:
        tokenizer.save_pretrained(out_dir)
    else:
        _make_processor(recipe.vision, tokenizer).save_pretrained(out_dir)
    make_tokenizer_config_portable(out_dir / "tokenizer_config.json")


def _canonical_state_dict(model: PreTrainedModel) -> dict[str, Any]:
    """Llava weights with the CLIP tower under `vision_tower.vision_model.`, as llava-hf checkpoints have them.

    transformers 5 strips that prefix when loading and, for a model built from scratch, does not put it back
    when saving; transformers 4 and vLLM need it, and transformers 5 loads both layouts.
    """
    prefix = "model.vision_tower."
    return {
        (prefix + "vision_model." + key.removeprefix(prefix) if key.startswith(prefix) else key): tensor
        for key, tensor in model.state_dict().items()
    }


def _text_config(recipe: Recipe, tokenizer: PreTrainedTokenizerFast) -> Any:
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    if recipe.architecture == "glm4_moe":
        return _glm45_config(recipe, recipe.moe or MoeRecipe(), tokenizer)
    config_class = {"qwen2": Qwen2Config, "qwen3": Qwen3Config}.get(recipe.architecture, LlamaConfig)
    endoftext_id, im_end_id = tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_END])
    return config_class(
        **_shape(recipe, tokenizer), eos_token_id=[im_end_id, endoftext_id], pad_token_id=endoftext_id
    )


def _shape(recipe: Recipe, tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """The config fields every text recipe sets alike: sizes, untied head, no BOS, float32."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": recipe.hidden_size,
        "intermediate_size": recipe.intermediate_size,
        "num_hidden_layers": recipe.num_hidden_layers,
        "num_attention_heads": recipe.num_attention_heads,
        "num_key_value_heads": recipe.num_key_value_heads,
        "head_dim": recipe.head_dim,
        "max_position_embeddings": recipe.max_position_embeddings,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "dtype": "float32",
    }


def _glm45_config(recipe: Recipe, moe: MoeRecipe, tokenizer: PreTrainedTokenizerFast) -> Any:
    """GLM-4.5-Air's config at a tiny size: q/k/v biases, half the head rotary, one shared expert,
    sigmoid routing without groups (n_group 1), no q/k norm, the three EOS ids."""
    from transformers import Glm4MoeConfig

    eos_ids = tokenizer.convert_tokens_to_ids(list(GLM45_EOS_TOKENS))
    return Glm4MoeConfig(
        **_shape(recipe, tokenizer),
        attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "partial_rotary_factor": 0.5},
        moe_intermediate_size=moe.moe_intermediate_size,
        n_routed_experts=moe.n_routed_experts,
        n_shared_experts=1,
        num_experts_per_tok=moe.num_experts_per_tok,
        first_k_dense_replace=moe.first_k_dense_replace,
        num_nextn_predict_layers=moe.num_nextn_predict_layers,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        use_qk_norm=False,
        eos_token_id=eos_ids,
        pad_token_id=eos_ids[0],
    )


def _glm45_hub_layout(recipe: Recipe, moe: MoeRecipe, model: PreTrainedModel, out_dir: Path) -> None:
    """What the hub's GLM-4.5 checkpoints hold beyond what transformers saves: the multi-token-prediction
    layer after the last decoder layer (transformers and vLLM's main model skip it) and config.json in
    the release's field names (rope_theta and partial_rotary_factor at the top, torch_dtype)."""
    import torch
    from safetensors.torch import save_file

    last, extra = recipe.num_hidden_layers - 1, {}
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    hidden, vocab = recipe.hidden_size, model.config.vocab_size
    for layer in range(recipe.num_hidden_layers, recipe.num_hidden_layers + moe.num_nextn_predict_layers):
        shapes = {
            name.replace(f"model.layers.{last}.", f"model.layers.{layer}."): tuple(tensor.shape)
            for name, tensor in model.state_dict().items()
            if name.startswith(f"model.layers.{last}.")
        }
        prefix = f"model.layers.{layer}."
        shapes |= {
            prefix + "eh_proj.weight": (hidden, 2 * hidden),
            prefix + "enorm.weight": (hidden,),
            prefix + "hnorm.weight": (hidden,),
            prefix + "embed_tokens.weight": (vocab, hidden),
            prefix + "shared_head.head.weight": (vocab, hidden),
            prefix + "shared_head.norm.weight": (hidden,),
        }
        for name, shape in sorted(shapes.items()):  # as _fill_weights: norms 1, biases 0, the rest N(0, std)
            if name.endswith("bias"):
                extra[name] = torch.zeros(shape)
            elif len(shape) == 1:
                extra[name] = torch.ones(shape)
            else:
                extra[name] = torch.empty(shape).normal_(0.0, _INIT_STD, generator=generator)
    shard = f"model-mtp-{recipe.num_hidden_layers:05d}.safetensors"
    save_file(extra, out_dir / shard, metadata={"format": "pt"})
    index_path = out_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] |= dict.fromkeys(extra, shard)
    index["metadata"]["total_size"] += sum(t.numel() * t.element_size() for t in extra.values())
    if "total_parameters" in index["metadata"]:
        index["metadata"]["total_parameters"] += sum(t.numel() for t in extra.values())
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    rope = config.pop("rope_parameters")
    config |= {"rope_theta": rope["rope_theta"], "partial_rotary_factor": rope["partial_rotary_factor"]}
    config["torch_dtype"] = config.pop("dtype")
    config_path.write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")


def _model_config(recipe: Recipe, tokenizer: PreTrainedTokenizerFast) -> Any:
    text_config = _text_config(recipe, tokenizer)
    if recipe.vision is None:
        return text_config
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = recipe.vision
    vision_config = CLIPVisionConfig(**asdict(vision), projection_dim=vision.hidden_size)
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
        dtype="float32",
    )


def _build_model(recipe: Recipe, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """Instantiate the architecture and fill it from a local generator seeded by the recipe."""
    import torch
    from transformers import (
        GenerationConfig,
        Glm4MoeForCausalLM,
        LlamaForCausalLM,
        LlavaForConditionalGeneration,
        Qwen2ForCausalLM,
        Qwen3ForCausalLM,
    )

    model_class = {
        "llama": LlamaForCausalLM,
        "qwen2": Qwen2ForCausalLM,
        "qwen3": Qwen3ForCausalLM,
        "llava": LlavaForConditionalGeneration,
        "glm4_moe": Glm4MoeForCausalLM,
    }
    config = _model_config(recipe, tokenizer)
    # Construction draws from the global RNG; fork it so callers' random state is left untouched.
    with torch.random.fork_rng(devices=[]):
        model = model_class[recipe.architecture](config).to(torch.float32)
    _fill_weights(model, recipe.seed)
    if recipe.quiet_lm_head:
        _quiet_lm_head(model, tokenizer)
    text_config = config.get_text_config()
    model.generation_config = GenerationConfig(
        eos_token_id=text_config.eos_token_id,
        pad_token_id=text_config.pad_token_id,
        do_sample=False,
    )
    return model.eval()


def _fill_weights(model: PreTrainedModel, seed: int) -> None:
    """Norm weights 1, biases 0, everything else N(0, 0.02) from a local generator, in parameter order."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and name.endswith(".weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, _INIT_STD, generator=generator)


def _quiet_lm_head(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> None:
    """Zero the output rows of special tokens and of tokens that are not printable ASCII.

    A random model otherwise happily emits lone non-UTF-8 bytes (which streaming detokenizers hold back
    forever, so a benchmark sees no text) or EOS after a few tokens. A zero row gives a logit of exactly 0,
    while the largest of thousands of random logits is well above 0, so greedy decoding never picks them
    and runs emit readable text up to max_tokens.
    """
    import torch

    special_ids = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    quiet_ids = [
        token_id
        for token_id in range(len(tokenizer))
        if token_id in special_ids or not _is_printable(tokenizer.decode([token_id]))
    ]
    with torch.no_grad():
        model.get_output_embeddings().weight[quiet_ids] = 0.0
    logger.debug("Zeroed %d lm_head rows", len(quiet_ids))


def _is_printable(text: str) -> bool:
    return bool(text) and all(char == "\n" or " " <= char <= "~" for char in text)


def _make_processor(vision: VisionRecipe, tokenizer: PreTrainedTokenizerFast) -> Any:
    """A LlavaProcessor with the PIL image processor, so it loads without torchvision."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
        image_token=IMAGE,
    )
