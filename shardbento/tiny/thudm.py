"""Tiny random-weight checkpoints in THUDM's own layout (ChatGLM3-6B, GLM-4-9B): config.json fields, tensor
names and shapes, and tokenizer files as the hub repositories have them, from a bilingual corpus."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from shardbento.thudm.tokenizer import CHATGLM3_SPECIALS, GLM4_SPECIALS
from shardbento.tiny.thudm_tokenizer import training_lines, write_sentencepiece, write_tiktoken

FORMAT_VERSION = 2  # 2: the tokenizers learn indented code (whitespace-run pieces)
_INIT_STD = 0.02
_VOCAB_PADDING = 64  # THUDM pads the vocabulary (65024, 151552); padded rows are never a real token


@dataclass(frozen=True, slots=True)
class ThudmRecipe:
    """Everything that determines a generated THUDM-layout checkpoint's bytes."""

    flavor: Literal["chatglm3", "glm4"]
    chat: bool = True  # GLM-4 chat configs list the role tags as EOS; the base config only <|endoftext|>
    vocab_size: int = 1200
    hidden_size: int = 256
    num_layers: int = 2
    num_attention_heads: int = 4
    multi_query_group_num: int = 2
    kv_channels: int = 64  # vLLM's CPU attention needs a head of at least 64
    ffn_hidden_size: int = 512
    seq_length: int = 2048
    max_shard_size_bytes: int = 2_000_000
    seed: int = 0
    vision: bool = False  # GLM-4V: an EVA2-CLIP tower under transformer.vision (sizes in _VISION)


THUDM_RECIPES: dict[str, ThudmRecipe] = {
    "tiny-chatglm3": ThudmRecipe(flavor="chatglm3"),
    "tiny-glm4": ThudmRecipe(flavor="glm4"),
    "tiny-glm4-base": ThudmRecipe(flavor="glm4", chat=False),
    "tiny-glm4v": ThudmRecipe(flavor="glm4", vision=True),
}
# GLM-4V's vision_config fields, tiny: 32 px images in 4 px patches (8 x 8), 4 x 4 after the convolution.
_VISION = {
    "dropout_prob": 0.0,
    "hidden_act": "gelu",
    "in_channels": 3,
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "patch_size": 4,
    "num_heads": 2,
    "intermediate_size": 128,
    "layer_norm_eps": 1e-06,
    "num_positions": 65,
    "image_size": 32,
    "scaling_factor": 8,
}


def thudm_digest(recipe: ThudmRecipe) -> str:
    hasher = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode())
    hasher.update(f"format={FORMAT_VERSION}".encode())
    for line in training_lines():
        hasher.update(line.encode())
    return hasher.hexdigest()[:10]


def build_thudm(recipe: ThudmRecipe, out_dir: Path) -> None:
    """Write tokenizer.model, tokenizer_config.json, config.json and sharded safetensors into `out_dir`."""
    if recipe.flavor == "chatglm3":
        base = write_sentencepiece(recipe.vocab_size, out_dir / "tokenizer.model")
        specials = CHATGLM3_SPECIALS
        eos: int | list[int] = 2  # </s>; chatglm3-6b's config lists no role tag (its chat() adds them)
        pad = 0
    else:
        base = write_tiktoken(recipe.vocab_size, out_dir / "tokenizer.model")
        specials = GLM4_SPECIALS
        ids = {token: base + index for index, token in enumerate(specials)}
        eos = (
            [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]
            if recipe.chat
            else ids["<|endoftext|>"]
        )
        pad = ids["<|endoftext|>"]
    num_words = base + len(specials)
    padded = -(-num_words // _VOCAB_PADDING) * _VOCAB_PADDING
    config = _config(recipe, padded, eos, pad)
    if recipe.vision:  # GLM-4V: GLM-4's specials hold the image boundaries
        config.update(boi_token_id=ids["<|begin_of_image|>"], eoi_token_id=ids["<|end_of_image|>"])
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(recipe), indent=2))
    _write_weights(recipe, config, num_words, out_dir)


def _config(recipe: ThudmRecipe, padded_vocab: int, eos: int | list[int], pad: int) -> dict[str, Any]:
    """config.json with the fields (and the auto_map) THUDM's repositories have."""
    config: dict[str, Any] = {
        "_name_or_path": f"THUDM/{'chatglm3-6b' if recipe.flavor == 'chatglm3' else 'glm-4-9b'}",
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": recipe.ffn_hidden_size,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": recipe.hidden_size,
        "kv_channels": recipe.kv_channels,
        "layernorm_epsilon": 1e-5 if recipe.flavor == "chatglm3" else 1.5625e-07,
        "multi_query_attention": True,
        "multi_query_group_num": recipe.multi_query_group_num,
        "num_attention_heads": recipe.num_attention_heads,
        "num_layers": recipe.num_layers,
        "original_rope": True,
        "padded_vocab_size": padded_vocab,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": recipe.seq_length,
        "use_cache": True,
        "torch_dtype": "float32",
        "tie_word_embeddings": False,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }
    if recipe.flavor == "glm4":
        config["rope_ratio"] = 500  # GLM-4's rotary base is 10000 x 500
    if recipe.vision:
        config["vision_config"] = dict(_VISION)
    return config


def _tokenizer_config(recipe: ThudmRecipe) -> dict[str, Any]:
    """tokenizer_config.json pointing at the remote tokenizer class, as on the hub (never run here)."""
    name = "ChatGLMTokenizer" if recipe.flavor == "chatglm3" else "ChatGLM4Tokenizer"
    config: dict[str, Any] = {
        "auto_map": {"AutoTokenizer": [f"tokenization_chatglm.{name}", None]},
        "tokenizer_class": name,
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "padding_side": "left",
        "remove_space": False,
    }
    if recipe.flavor == "glm4":
        config.update(
            eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=recipe.seq_length
        )
    return config


def _tensor_shapes(recipe: ThudmRecipe, padded_vocab: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """THUDM's tensor names and shapes, in the checkpoint's order."""
    hidden, head = recipe.hidden_size, recipe.kv_channels
    qkv = (recipe.num_attention_heads + 2 * recipe.multi_query_group_num) * head
    yield "transformer.embedding.word_embeddings.weight", (padded_vocab, hidden)
    for layer in range(recipe.num_layers):
        prefix = f"transformer.encoder.layers.{layer}."
        yield prefix + "input_layernorm.weight", (hidden,)
        yield prefix + "self_attention.query_key_value.weight", (qkv, hidden)
        yield prefix + "self_attention.query_key_value.bias", (qkv,)
        yield prefix + "self_attention.dense.weight", (hidden, recipe.num_attention_heads * head)
        yield prefix + "post_attention_layernorm.weight", (hidden,)
        yield prefix + "mlp.dense_h_to_4h.weight", (2 * recipe.ffn_hidden_size, hidden)
        yield prefix + "mlp.dense_4h_to_h.weight", (hidden, recipe.ffn_hidden_size)
    yield "transformer.encoder.final_layernorm.weight", (hidden,)
    yield "transformer.output_layer.weight", (padded_vocab, hidden)
    if recipe.vision:
        yield from _vision_shapes(hidden, recipe.ffn_hidden_size)


def _vision_shapes(text_hidden: int, ffn: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """GLM-4V's transformer.vision.* tensors: patch embedding, EVA2-CLIP layers, GLU, conv, boi/eoi."""
    width, inner, patch = _VISION["hidden_size"], _VISION["intermediate_size"], _VISION["patch_size"]
    prefix = "transformer.vision."
    yield prefix + "patch_embedding.proj.weight", (width, _VISION["in_channels"], patch, patch)
    yield prefix + "patch_embedding.proj.bias", (width,)
    yield prefix + "patch_embedding.cls_embedding", (1, width)
    yield prefix + "patch_embedding.position_embedding.weight", (_VISION["num_positions"], width)
    for layer in range(_VISION["num_hidden_layers"]):
        block = f"{prefix}transformer.layers.{layer}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield block + f"{norm}.weight", (width,)
            yield block + f"{norm}.bias", (width,)
        for name, rows, cols in (
            ("attention.query_key_value", 3 * width, width),
            ("attention.dense", width, width),
            ("mlp.fc1", inner, width),
            ("mlp.fc2", width, inner),
        ):
            yield block + f"{name}.weight", (rows, cols)
            yield block + f"{name}.bias", (rows,)
    yield prefix + "linear_proj.linear_proj.weight", (text_hidden, text_hidden)
    yield prefix + "linear_proj.norm1.weight", (text_hidden,)
    yield prefix + "linear_proj.norm1.bias", (text_hidden,)
    yield prefix + "linear_proj.dense_h_to_4h.weight", (ffn, text_hidden)
    yield prefix + "linear_proj.gate_proj.weight", (ffn, text_hidden)
    yield prefix + "linear_proj.dense_4h_to_h.weight", (text_hidden, ffn)
    yield prefix + "conv.weight", (text_hidden, width, 2, 2)
    yield prefix + "conv.bias", (text_hidden,)
    yield prefix + "boi", (1, 1, text_hidden)
    yield prefix + "eoi", (1, 1, text_hidden)


def _write_weights(recipe: ThudmRecipe, config: dict[str, Any], num_words: int, out_dir: Path) -> None:
    """Seeded random tensors (norms near 1, biases non-zero, padded output rows zero so no padded id is
    ever the argmax), the rotary buffer as the original computes it, in shards with their index."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(recipe.seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in _tensor_shapes(recipe, config["padded_vocab_size"]):
        tensor = torch.randn(shape, generator=generator) * _INIT_STD
        if name.endswith(("layernorm.weight", "norm1.weight")):
            tensor += 1.0
        if name == "transformer.output_layer.weight":
            tensor[num_words:] = 0.0
        tensors[name] = tensor
    rotary = recipe.kv_channels // 2
    base = 10000.0 * config.get("rope_ratio", 1)
    tensors["transformer.rotary_pos_emb.inv_freq"] = 1.0 / base ** (
        torch.arange(0, rotary, 2).float() / rotary
    )
    shards: list[dict[str, torch.Tensor]] = [{}]
    for name, tensor in tensors.items():
        size = sum(t.numel() * t.element_size() for t in shards[-1].values())
        if shards[-1] and size + tensor.numel() * tensor.element_size() > recipe.max_shard_size_bytes:
            shards.append({})
        shards[-1][name] = tensor
    weight_map = {}
    for index, shard in enumerate(shards, 1):
        file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
