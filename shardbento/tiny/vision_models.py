"""Tiny random-weight vision checkpoints in their hub repositories' layout: Llama 3.2 Vision (Mllama: a
tiled image tower, cross-attention layers, `<|image|>` past the text vocabulary) and Qwen2.5-VL (a
dynamic-resolution tower, multimodal rotary positions): config.json, tensor names, tokenizer and
processor files as the hub has them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from shardbento.tiny.tokenizer import corpus_lines, make_tokenizer_config_portable
from shardbento.tiny.vision_templates import LLAMA32_VISION_CHAT_TEMPLATE, QWEN2_VL_CHAT_TEMPLATE

FORMAT_VERSION = 1
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Llama 3's specials follow its BPE vocabulary (128000..); the image token comes after all of them, so its
# id equals the text vocabulary size: the logits never have a column for it.
LLAMA_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
LLAMA_IMAGE = "<|image|>"
QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_QWEN_PADDING = 64  # Qwen pads its embedding (152064 rows for 151665 tokens): ids past the tokenizer


@dataclass(frozen=True, slots=True)
class VisionCheckpointRecipe:
    """Everything that determines a generated Mllama or Qwen2.5-VL checkpoint's bytes."""

    family: Literal["mllama", "qwen2_5_vl"]
    bpe_tokens: int = 1000
    hidden_size: int = 256
    num_hidden_layers: int = 5
    cross_attention_layers: tuple[int, ...] = (1, 3)  # Mllama: every fifth layer from 3 in the 90B
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 2048
    image_size: int = 32  # Mllama: a tile's side (560 in the real model)
    max_num_tiles: int = 4
    vision_hidden: int = 64
    vision_layers: int = 2
    seed: int = 0
    # Weights N(0, init_std): at 0.02 (the other tiny models') a prompt's last tokens (every chat ends with
    # the same assistant header) decide the answer alone; at 0.1 the answers depend on the prompt and the
    # image, which the batching tests need to tell rows apart.
    init_std: float = 0.1


VISION_RECIPES: dict[str, VisionCheckpointRecipe] = {
    "tiny-mllama": VisionCheckpointRecipe(family="mllama"),
    "tiny-qwen2.5-vl": VisionCheckpointRecipe(family="qwen2_5_vl", num_hidden_layers=2),
}


def vision_digest(recipe: VisionCheckpointRecipe) -> str:
    hasher = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode())
    hasher.update(f"format={FORMAT_VERSION}".encode())
    hasher.update((LLAMA32_VISION_CHAT_TEMPLATE + QWEN2_VL_CHAT_TEMPLATE).encode())
    for line in corpus_lines():
        hasher.update(line.encode())
    return hasher.hexdigest()[:10]


def build_vision_checkpoint(recipe: VisionCheckpointRecipe, out_dir: Path) -> None:
    """Tokenizer, processor files, config.json, generation_config.json and safetensors into `out_dir`."""
    if recipe.family == "mllama":
        tokenizer = _tokenizer(recipe, LLAMA_SPECIALS + (LLAMA_IMAGE,), bos="<|begin_of_text|>")
        tokenizer.pad_token, tokenizer.eos_token = "<|finetune_right_pad_id|>", "<|eot_id|>"
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LLAMA_SPECIALS + (LLAMA_IMAGE,)}
        model, eos, pad = (
            _mllama(recipe, ids),
            ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
            ids["<|finetune_right_pad_id|>"],
        )
        processor = _mllama_processor_config(recipe)
        template = LLAMA32_VISION_CHAT_TEMPLATE
    else:
        tokenizer = _tokenizer(recipe, QWEN_SPECIALS, bos=None)
        tokenizer.pad_token, tokenizer.eos_token = "<|endoftext|>", "<|im_end|>"
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
        model, eos, pad = (
            _qwen(recipe, ids, len(tokenizer)),
            ["<|im_end|>", "<|endoftext|>"],
            ids["<|endoftext|>"],
        )
        processor = _qwen_processor_config()
        template = QWEN2_VL_CHAT_TEMPLATE
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in eos],
        pad_token_id=pad,
        do_sample=False,
    )
    model.save_pretrained(out_dir, max_shard_size="4MB")
    if recipe.family == "qwen2_5_vl":  # the hub's config.json is flat: text fields at the top level
        (out_dir / "config.json").write_text(json.dumps(_qwen_hub_config(model.config), indent=2) + "\n")
    tokenizer.save_pretrained(out_dir)
    make_tokenizer_config_portable(out_dir / "tokenizer_config.json")
    (out_dir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n")


def _tokenizer(recipe: VisionCheckpointRecipe, specials: tuple[str, ...], bos: str | None) -> Any:
    """A byte-level BPE on the shared corpus with the family's specials after it, as Llama 3's and
    Qwen2's tokenizers place them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.bpe_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus_lines(), trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=recipe.max_position_embeddings,
        model_input_names=["input_ids", "attention_mask"],
    )
    if bos is not None:
        tokenizer.bos_token = bos
    return tokenizer


def _mllama(recipe: VisionCheckpointRecipe, ids: dict[str, int]) -> Any:
    """MllamaForConditionalGeneration: `<|image|>` is the first id past the text vocabulary (the logits'
    width), the embedding has 8 rows more, as Meta's checkpoints do."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    text_vocab = ids[LLAMA_IMAGE]
    indices = list(range(recipe.vision_layers))
    config = MllamaConfig(
        text_config={
            "vocab_size": text_vocab,
            "hidden_size": recipe.hidden_size,
            "intermediate_size": recipe.intermediate_size,
            "num_hidden_layers": recipe.num_hidden_layers,
            "cross_attention_layers": list(recipe.cross_attention_layers),
            "num_attention_heads": recipe.num_attention_heads,
            "num_key_value_heads": recipe.num_key_value_heads,
            "max_position_embeddings": recipe.max_position_embeddings,
            "rope_theta": 500000.0,
            "bos_token_id": ids["<|begin_of_text|>"],
            "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
            "pad_token_id": ids["<|finetune_right_pad_id|>"],
            "tie_word_embeddings": False,
        },
        vision_config={
            "hidden_size": recipe.vision_hidden,
            "intermediate_size": 2 * recipe.vision_hidden,
            "num_hidden_layers": recipe.vision_layers,
            "num_global_layers": 1,
            "attention_heads": 2,
            "image_size": recipe.image_size,
            "patch_size": 8,
            "max_num_tiles": recipe.max_num_tiles,
            "intermediate_layers_indices": indices,
            "vision_output_dim": recipe.vision_hidden * (len(indices) + 1),
        },
        image_token_index=ids[LLAMA_IMAGE],
    )
    return _seeded(MllamaForConditionalGeneration, config, recipe)


def _qwen(recipe: VisionCheckpointRecipe, ids: dict[str, int], num_tokens: int) -> Any:
    """Qwen2_5_VLForConditionalGeneration with Qwen2.5-VL-7B's structure at a tiny width."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    head_dim = recipe.hidden_size // recipe.num_attention_heads
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # 7B: [16, 24, 24] of 64
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": -(-num_tokens // _QWEN_PADDING) * _QWEN_PADDING,
            "hidden_size": recipe.hidden_size,
            "intermediate_size": recipe.intermediate_size,
            "num_hidden_layers": recipe.num_hidden_layers,
            "num_attention_heads": recipe.num_attention_heads,
            "num_key_value_heads": recipe.num_key_value_heads,
            "max_position_embeddings": recipe.max_position_embeddings,
            "rope_scaling": {"type": "mrope", "mrope_section": section},
            "rope_theta": 1000000.0,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": recipe.vision_layers,
            "hidden_size": recipe.vision_hidden,
            "intermediate_size": 2 * recipe.vision_hidden,
            "num_heads": 2,
            "out_hidden_size": recipe.hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [recipe.vision_layers - 1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    return _seeded(Qwen2_5_VLForConditionalGeneration, config, recipe)


def _qwen_hub_config(config: Any) -> dict[str, Any]:
    """config.json as Qwen/Qwen2.5-VL-7B-Instruct has it: the text model's fields at the top level (with
    its sliding_window, unused), rope_scaling's mrope sections, the vision tower under vision_config."""
    text, vision = config.text_config, config.vision_config
    rope = text.rope_parameters
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id,
        "vision_token_id": config.vision_start_token_id + 2,
        "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "hidden_act": text.hidden_act,
        "hidden_size": text.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": text.intermediate_size,
        "max_position_embeddings": text.max_position_embeddings,
        "max_window_layers": text.num_hidden_layers,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": rope["rope_theta"],
        "sliding_window": text.max_position_embeddings,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": vision.depth,
            "hidden_act": vision.hidden_act,
            "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size,
            "num_heads": vision.num_heads,
            "in_chans": 3,
            "out_hidden_size": vision.out_hidden_size,
            "patch_size": vision.patch_size,
            "spatial_merge_size": vision.spatial_merge_size,
            "spatial_patch_size": vision.patch_size,
            "window_size": vision.window_size,
            "fullatt_block_indexes": list(vision.fullatt_block_indexes),
            "tokens_per_second": vision.tokens_per_second,
            "temporal_patch_size": vision.temporal_patch_size,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": list(rope["mrope_section"])},
        "vocab_size": text.vocab_size,
    }


def _seeded(model_class: Any, config: Any, recipe: VisionCheckpointRecipe) -> Any:
    """The model in float32 with weights from a local generator: norms 1, biases 0, gates 1 (Mllama's
    cross-attention and tile gates start at 0 in training, which would make the image invisible), the
    rest N(0, init_std)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        model = model_class(config).to(torch.float32)
    generator = torch.Generator().manual_seed(recipe.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and name.endswith(".weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            elif "gate" in name.rsplit(".", 1)[-1] and param.numel() == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, recipe.init_std, generator=generator)
    return model.eval()


def _mllama_processor_config(recipe: VisionCheckpointRecipe) -> dict[str, Any]:
    """preprocessor_config.json of Llama 3.2 Vision: 560 px tiles, up to 4 per image (tiny: 32 px)."""
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": _CLIP_MEAN,
        "image_processor_type": "MllamaImageProcessor",
        "image_std": _CLIP_STD,
        "max_image_tiles": recipe.max_num_tiles,
        "processor_class": "MllamaProcessor",
        "resample": 2,
        "rescale_factor": 1 / 255,
        "size": {"height": recipe.image_size, "width": recipe.image_size},
    }


def _qwen_processor_config() -> dict[str, Any]:
    """preprocessor_config.json of Qwen2.5-VL: 14 px patches merged 2 x 2; tiny pixel bounds (an image
    becomes 1 to 16 tokens; the 7B's allow 16,384)."""
    return {
        "min_pixels": 28 * 28,
        "max_pixels": 16 * 28 * 28,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": _CLIP_MEAN,
        "image_std": _CLIP_STD,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }
