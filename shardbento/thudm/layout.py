"""THUDM's ChatGLM checkpoint layout in transformers' terms: which loader a config.json needs, the native
GlmConfig it maps to, each tensor's native name, and device maps written in the checkpoint's module names.

Imports only the standard library: preflight and `plan` decide from a config.json before any weight or
torch is touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

LoaderKind = Literal["transformers", "chatglm", "chatglm-vision", "remote-code"]


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded here; the message says why and what to do instead."""


@dataclass(frozen=True, slots=True)
class LoaderDecision:
    """How a checkpoint loads: the class that runs it and where its tokenizer comes from."""

    kind: LoaderKind
    model_class: str
    tokenizer: str
    reason: str

    def render(self) -> str:
        return f"loader: {self.model_class} ({self.reason}); tokenizer: {self.tokenizer}"


def is_thudm(config: dict[str, Any]) -> bool:
    """A THUDM-format checkpoint (ChatGLM2/3, GLM-4, GLM-4V): model_type chatglm and its own field names."""
    return config.get("model_type") == "chatglm"


def loader_decision(config: dict[str, Any], kind: str, trust_remote_code: bool) -> LoaderDecision:
    """The loader for a config.json; raises CheckpointError with the reason and the fix when none here
    can load it (before any weight is downloaded)."""
    if is_thudm(config):
        glm_config(config)  # raises for a variant the native model cannot reproduce
        if "vision_config" in config:
            if kind != "vision":
                raise CheckpointError("a GLM-4V checkpoint (it has a vision_config) needs kind: vision")
            return LoaderDecision(
                kind="chatglm-vision",
                model_class="Glm4vForConditionalGeneration",
                tokenizer=_tokenizer_note(config),
                reason="THUDM layout: transformers' GLM and the package's EVA2-CLIP tower, no remote code",
            )
        return LoaderDecision(
            kind="chatglm",
            model_class="GlmForCausalLM",
            tokenizer=_tokenizer_note(config),
            reason="THUDM layout converted to transformers' own GLM, no remote code",
        )
    if config.get("auto_map") and not _native_architecture(config):
        if not trust_remote_code:
            raise CheckpointError(
                f"the checkpoint's architecture {config.get('architectures')} exists only as remote code "
                "(config.json auto_map) and trust_remote_code is false; set trust_remote_code: true if you "
                "trust that repository's code, or point source at a transformers-native conversion"
            )
        return LoaderDecision(
            "remote-code", str(config.get("architectures")), "the repository's", "remote code"
        )
    model_class = "AutoModelForImageTextToText" if kind == "vision" else "AutoModelForCausalLM"
    architectures = config.get("architectures") or ["?"]
    return LoaderDecision("transformers", model_class, "tokenizer.json", f"transformers' {architectures[0]}")


def _native_architecture(config: dict[str, Any]) -> bool:
    """Whether transformers knows this model_type itself (an auto_map is then only a fallback)."""
    try:
        from transformers import CONFIG_MAPPING
    except ImportError:
        return False
    return config.get("model_type") in CONFIG_MAPPING


def _tokenizer_note(config: dict[str, Any]) -> str:
    if config.get("padded_vocab_size", 0) > 100_000:
        return "tokenizer.model (tiktoken ranks) converted to a fast tokenizer"
    return "tokenizer.model (SentencePiece) converted to a fast tokenizer"


def glm_config(config: dict[str, Any]) -> dict[str, Any]:
    """transformers' GlmConfig fields for a ChatGLM2/3 or GLM-4 config.json."""
    unsupported = {
        "rmsnorm": (True, "LayerNorm instead of RMSNorm"),
        "post_layer_norm": (True, "no final norm"),
        "apply_residual_connection_post_layernorm": (False, "residuals taken after the norm"),
        "add_bias_linear": (False, "biases on the dense and MLP layers"),
        "original_rope": (True, "the non-original rotary embedding"),
    }
    for field, (wanted, what) in unsupported.items():
        if config.get(field, wanted) != wanted:
            raise CheckpointError(
                f"config.json sets {field}: {config.get(field)} ({what}), which transformers' GLM does not "
                "implement; serve this checkpoint with engine: vllm or its remote code (trust_remote_code)"
            )
    heads = config["num_attention_heads"]
    head_dim = config.get("kv_channels") or config["hidden_size"] // heads
    groups = config["multi_query_group_num"] if config.get("multi_query_attention") else heads
    eos = config.get("eos_token_id")
    vision = _vision_fields(config)
    model_type, architecture = native_model_type(config)
    return vision | {
        "model_type": model_type,
        "architectures": [architecture],
        "vocab_size": config["padded_vocab_size"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["ffn_hidden_size"],
        "num_hidden_layers": config["num_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": groups,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.get("seq_length", 8192),
        "rms_norm_eps": config.get("layernorm_epsilon", 1e-5),
        "attention_bias": bool(config.get("add_qkv_bias", False)),
        # ChatGLM rotates the first half of each head, pairs interleaved, base 10000 x rope_ratio.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0 * float(config.get("rope_ratio", 1.0)),
            "partial_rotary_factor": 0.5,
        },
        "tie_word_embeddings": False,
        "pad_token_id": config.get("pad_token_id"),
        "eos_token_id": eos,
        "bos_token_id": None,
        "dtype": config.get("torch_dtype", "bfloat16"),
    }


def _vision_fields(config: dict[str, Any]) -> dict[str, Any]:
    """GLM-4V's extra fields for the package's model type (engine/hf/glm4v.py)."""
    if "vision_config" not in config:
        return {}
    return {
        "vision_config": config["vision_config"],
        "boi_token_id": config.get("boi_token_id"),
        "eoi_token_id": config.get("eoi_token_id"),
    }


def native_model_type(config: dict[str, Any]) -> tuple[str, str]:
    """(model_type, architecture) of the converted checkpoint."""
    if "vision_config" in config:
        return "shardbento_glm4v", "Glm4vForConditionalGeneration"
    return "glm", "GlmForCausalLM"


def qkv_sizes(config: dict[str, Any]) -> tuple[int, int, int]:
    """Rows of q, k and v in the fused query_key_value weight."""
    native = glm_config(config)
    head_dim = native["head_dim"]
    kv = native["num_key_value_heads"] * head_dim
    return native["num_attention_heads"] * head_dim, kv, kv


_LAYER = r"transformer\.encoder\.layers\.(\d+)\."
_RENAMES = (
    (re.compile(r"^transformer\.embedding\.word_embeddings\."), "model.embed_tokens."),
    (re.compile(r"^transformer\.encoder\.final_layernorm\."), "model.norm."),
    (re.compile(r"^transformer\.output_layer\."), "lm_head."),
    (re.compile(rf"^{_LAYER}self_attention\.dense\."), r"model.layers.\1.self_attn.o_proj."),
    (re.compile(rf"^{_LAYER}mlp\.dense_h_to_4h\."), r"model.layers.\1.mlp.gate_up_proj."),
    (re.compile(rf"^{_LAYER}mlp\.dense_4h_to_h\."), r"model.layers.\1.mlp.down_proj."),
    (re.compile(rf"^{_LAYER}(input_layernorm|post_attention_layernorm)\."), r"model.layers.\1.\2."),
)
_QKV = re.compile(rf"^{_LAYER}self_attention\.query_key_value\.(weight|bias)$")
DROPPED = re.compile(r"^transformer\.rotary_pos_emb\.inv_freq$")  # recomputed from the config
_VISION = re.compile(r"^transformer\.vision\.")  # GLM-4V's tower: the package's module keeps its names


def native_names(name: str) -> tuple[str, ...]:
    """The native tensor name(s) of a checkpoint tensor: three (q, k, v) for the fused query_key_value,
    none for the rotary buffer; raises CheckpointError for a tensor the native model has no place for."""
    if DROPPED.match(name):
        return ()
    if _VISION.match(name):
        return (_VISION.sub("vision.", name),)
    fused = _QKV.match(name)
    if fused:
        layer, part = fused.groups()
        return tuple(f"model.layers.{layer}.self_attn.{p}_proj.{part}" for p in ("q", "k", "v"))
    for pattern, replacement in _RENAMES:
        if pattern.match(name):
            return (pattern.sub(replacement, name),)
    raise CheckpointError(f"checkpoint tensor {name!r} has no place in transformers' GLM")


# Module names a guide's device_map uses, and the native module each stands for.
_MAP_KEYS = (
    (re.compile(r"^transformer\.(?:encoder\.layers|h|layers)\.(\d+)$"), r"model.layers.\1"),
    (re.compile(r"^transformer\.(?:embedding(?:\.word_embeddings)?|word_embeddings)$"), "model.embed_tokens"),
    (re.compile(r"^transformer\.(?:encoder\.final_layernorm|final_layernorm)$"), "model.norm"),
    (re.compile(r"^(?:transformer\.output_layer|lm_head)$"), "lm_head"),
    (re.compile(r"^transformer\.rotary_pos_emb$"), "model.rotary_emb"),
    (re.compile(r"^transformer\.vision$"), "vision"),
    (re.compile(r"^transformer(?:\.encoder)?$"), "model"),
)
_NATIVE_KEY = re.compile(r"^(?:model(?:\.(?:layers\.\d+|embed_tokens|norm|rotary_emb))?|lm_head|vision)$")


def translate_device_map(device_map: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """A device map in ChatGLM's names (`transformer.encoder.layers.N`, the `transformer.h.N` shorthand,
    `transformer.output_layer` or `lm_head`) or in native names, as native module names; raises
    CheckpointError naming the valid keys for any other key or a layer past the model's."""
    translated: dict[str, Any] = {}
    for key, device in device_map.items():
        native = _translate_key(key)
        if native is None:
            raise CheckpointError(
                f"device_map key {key!r} names no module of this GLM checkpoint; valid keys: "
                f"transformer.encoder.layers.N or transformer.h.N (N < {num_layers}), transformer.embedding, "
                "transformer.encoder.final_layernorm, transformer.output_layer (or lm_head), "
                "transformer.rotary_pos_emb, or the native model.layers.N, model.embed_tokens, model.norm, "
                "model.rotary_emb, lm_head"
            )
        layer = re.match(r"model\.layers\.(\d+)$", native)
        if layer and int(layer.group(1)) >= num_layers:
            raise CheckpointError(f"device_map key {key!r}: the model has layers 0..{num_layers - 1}")
        translated[native] = device
    if (
        "model.embed_tokens" in translated
        and "model.rotary_emb" not in translated
        and "model" not in translated
    ):
        translated["model.rotary_emb"] = translated["model.embed_tokens"]  # ChatGLM maps no rotary module
    return translated


def _translate_key(key: str) -> str | None:
    if _NATIVE_KEY.match(key):
        return key
    for pattern, replacement in _MAP_KEYS:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return None
