"""Memory arithmetic before a byte loads: GPU kinds, a config's shape, weights, KV cache and the headroom."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from shardbento.plan.experts import Experts, experts_of

GIB = 1024**3
GB = 1000**3
DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}
# Bytes per weight of a quantized linear layer; embeddings, norms and lm_head keep the dtype.
QUANT_BYTES = {"none": None, "int8": 1.0, "int4": 0.5, "fp8": 1.0}
# vLLM's quantization methods as the bytes their weights take (methods whose bits the checkpoint's own
# config tells, AWQ and GPTQ, are counted from it first); a method not named here is counted at dtype.
VLLM_QUANT = {
    "fp8": "fp8",
    "fp8_per_tensor": "fp8",
    "fp8_per_block": "fp8",
    "fp8_per_channel": "fp8",
    "fbgemm_fp8": "fp8",
    "modelopt": "fp8",
    "int8_per_channel_weight_only": "int8",
    "awq": "int4",
    "awq_marlin": "int4",
    "gptq": "int4",
    "gptq_marlin": "int4",
    "experts_int8": "int8",
}
# The headroom, defined here only: what planning, preflight and placement keep free beside weights + KV.
ACTIVATION_FRACTION = 0.10  # activations and allocator slack, over the weights (as the engine's warm-up sees)
CUDA_CONTEXT_BYTES = 1 * GIB  # per GPU: CUDA context, cuBLAS workspaces, NCCL buffers
# A deployment works when its KV pool (kv_pool_tokens below) holds one sequence at full context, as
# vLLM requires; more room is more concurrency, which the plan prints.
MIN_POOL_SEQUENCES = 1

# Ampere and later compute bfloat16 natively; older GPUs emulate it (slowly): they run float16 instead.
NATIVE_BF16_CAPABILITY = (8, 0)
# name: (memory in bytes as sold, compute capability)
GPU_KINDS: dict[str, tuple[int, tuple[int, int]]] = {
    "T4-16GB": (16 * GB, (7, 5)),
    "V100-16GB": (16 * GB, (7, 0)),
    "V100-32GB": (32 * GB, (7, 0)),
    "A10G-24GB": (24 * GB, (8, 6)),
    "A10-24GB": (24 * GB, (8, 6)),
    "RTX3090-24GB": (24 * GB, (8, 6)),
    "RTX4090-24GB": (24 * GB, (8, 9)),
    "A6000-48GB": (48 * GB, (8, 6)),
    "L40S-48GB": (48 * GB, (8, 9)),
    "L4-24GB": (24 * GB, (8, 9)),
    "A100-40GB": (40 * GB, (8, 0)),
    "A100-80GB": (80 * GB, (8, 0)),
    "H100-80GB": (80 * GB, (9, 0)),
    "H200-141GB": (141 * GB, (9, 0)),
    "B200-192GB": (192 * GB, (10, 0)),
}
# BentoML gpu_type → our GPU kind.
BENTO_GPU_KINDS = {
    "nvidia-tesla-t4": "T4-16GB",
    "nvidia-tesla-v100": "V100-16GB",
    "nvidia-tesla-a100": "A100-40GB",
    "nvidia-a100-80gb": "A100-80GB",
    "nvidia-a10g": "A10G-24GB",
    "nvidia-l4": "L4-24GB",
    "nvidia-h100-80gb": "H100-80GB",
    "nvidia-h200-141gb": "H200-141GB",
    "nvidia-b200": "B200-192GB",
}
Mode = Literal["layers", "tensor"]


class PlanError(ValueError):
    """The model cannot be served as asked; the message has the numbers and the fix."""


@dataclass(frozen=True, slots=True)
class GpuKind:
    name: str
    memory_bytes: int
    capability: tuple[int, int]


def parse_gpus(text: str) -> tuple[int | None, GpuKind]:
    """'4xA100-80GB' → (4, A100-80GB); 'H100-80GB' → (None, H100-80GB); bentoml names accepted too."""
    match = re.fullmatch(r"(?:(\d+)\s*[xX×]\s*)?(.+)", text.strip())
    count, name = (int(match[1]) if match and match[1] else None), (match[2] if match else text)
    name = BENTO_GPU_KINDS.get(name.lower(), name)
    for known, (memory, capability) in GPU_KINDS.items():
        if known.lower() == name.lower():
            return count, GpuKind(known, memory, capability)
    raise PlanError(f"unknown GPU {name!r}; known: {', '.join(GPU_KINDS)} (e.g. 4xA100-80GB)")


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The numbers of a config.json that memory depends on (text decoder, cross-attention, vision tower)."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_cross_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied: bool
    qkv_bias: bool
    vision_params: int
    vision_layer_params: int
    vision_heads: int
    image_kv_tokens: int  # tokens each image adds to the cross-attention KV cache (0: none)
    checkpoint_quantization: str | None = None  # a pre-quantized checkpoint's own format (AWQ, GPTQ, FP8)
    moe: Experts | None = None  # a mixture of experts in the MLPs of the layers it names

    @property
    def routed_expert_params(self) -> int:
        """Every layer's routed experts together (0 for a dense model)."""
        if self.moe is None:
            return 0
        sparse = sum(self.moe.sparse(i) for i in range(self.num_layers))
        return sparse * self.moe.routed_params(self.hidden_size)

    def layer_params_at(self, layer: int) -> int:
        """One decoder layer's parameters: attention, norms, and its MLP (dense, or its experts)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        if self.moe is not None and self.moe.sparse(layer):
            return attn + self.moe.params(h) + 2 * h
        return attn + 3 * h * self.intermediate_size + 2 * h

    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        heads = 1 if self.tied else 2
        layers = sum(self.layer_params_at(i) for i in range(self.num_layers))
        return layers + heads * self.embed_params + self.hidden_size + self.vision_params


def _vision(vision: dict[str, Any], text_hidden: int) -> tuple[int, int, int, int]:
    """(params, params per layer, heads, cross-attention tokens per image) of a vision tower."""
    if not vision:
        return 0, 0, 0, 0
    hidden = vision["hidden_size"]
    inner = vision.get("intermediate_size", 4 * hidden)
    gated = 3 if vision.get("hidden_act") == "silu" else 2
    depth = vision.get("num_hidden_layers", vision.get("depth", 0)) + vision.get("num_global_layers", 0)
    layer = 4 * hidden * hidden + gated * hidden * inner
    out = vision.get("vision_output_dim") or vision.get("out_hidden_size") or hidden
    patches = (vision.get("image_size", 0) // max(vision.get("patch_size", 1), 1)) ** 2
    image_tokens = vision.get("max_num_tiles", 0) * (patches + 1)
    heads = vision.get("num_heads", vision.get("attention_heads", 0))
    return depth * layer + out * text_hidden, layer, heads, image_tokens


def _glm4v_adapter(config: dict[str, Any]) -> int:
    """What GLM-4V adds beside the tower's layers and one projection: the patch embedding, position
    table, the 2x2 convolution into the text width and its GLU projector (gate, up, down)."""
    vision, text_hidden, ffn = config["vision_config"], config["hidden_size"], config["ffn_hidden_size"]
    width = vision["hidden_size"]
    patch = vision.get("in_channels", 3) * width * vision["patch_size"] ** 2 + 2 * width  # conv, bias, cls
    positions = vision.get("num_positions", 0) * width
    conv = width * text_hidden * 4 + text_hidden
    glu = text_hidden * text_hidden + 3 * text_hidden * ffn + 2 * text_hidden  # proj, gate/up/down, norm
    boundary = 2 * text_hidden  # the learned boi and eoi vectors
    return patch + positions + conv + glu + boundary - width * text_hidden  # _vision counted one projection


def model_shape(config: dict[str, Any]) -> ModelShape:
    """Read a config.json (Llama-like, ChatGLM, Mllama, Qwen-VL); unknown keys are ignored."""
    text = config.get("text_config") or config
    hidden = text["hidden_size"]
    heads = text["num_attention_heads"]
    layers = text.get("num_hidden_layers", text.get("num_layers"))
    cross = len(text.get("cross_attention_layers") or [])
    if config.get("model_type") == "mllama" and not cross:
        cross = layers // 5  # every fifth text layer attends to the image (3, 8, ..., 98)
    vision_params, vision_layer, vision_heads, image_tokens = _vision(
        config.get("vision_config") or {}, hidden
    )
    if config.get("model_type") == "chatglm" and config.get("vision_config"):
        vision_params += _glm4v_adapter(config)
    return ModelShape(
        model_type=config.get("model_type", "?"),
        hidden_size=hidden,
        intermediate_size=text.get("intermediate_size", text.get("ffn_hidden_size")),
        num_layers=layers,
        num_cross_layers=cross,
        num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads", text.get("multi_query_group_num", heads)),
        head_dim=text.get("head_dim") or text.get("kv_channels") or hidden // heads,
        vocab_size=text.get("vocab_size", text.get("padded_vocab_size")),
        tied=bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
        qkv_bias=bool(
            text.get(
                "attention_bias", text.get("add_qkv_bias", config.get("model_type", "").startswith("qwen2"))
            )
        ),
        vision_params=vision_params,
        vision_layer_params=vision_layer,
        vision_heads=vision_heads,
        image_kv_tokens=image_tokens if cross else 0,
        checkpoint_quantization=checkpoint_quantization(config),
        moe=experts_of(text),
    )


def checkpoint_quantization(config: dict[str, Any]) -> str | None:
    """How a pre-quantized checkpoint stores its layers' weights, from config.json's quantization_config:
    AWQ and GPTQ by their bits (int4, int8), FP8 (fp8, or compressed-tensors with 8-bit float weights);
    None for a full-precision checkpoint or a format this planner cannot count."""
    quant = config.get("quantization_config") or {}
    method = str(quant.get("quant_method", "")).lower()
    bits = quant.get("bits", quant.get("w_bit"))
    if method in ("awq", "gptq") and bits in (4, 8):
        return "int4" if bits == 4 else "int8"
    if method == "fp8":
        return "fp8"
    if method == "compressed-tensors":
        for group in (quant.get("config_groups") or {}).values():
            weights = group.get("weights") or {}
            if weights.get("num_bits") == 8:
                return "fp8" if weights.get("type") == "float" else "int8"
            if weights.get("num_bits") == 4:
                return "int4"
    return None


def load_config(path: Path) -> dict[str, Any]:
    return {k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")}


@dataclass(frozen=True, slots=True)
class Budget:
    """What one deployment needs, in bytes, before per-GPU overhead."""

    dtype: str
    quantization: str
    num_params: int
    weight_bytes: int
    kv_bytes_per_token: int
    kv_bytes_per_image: int
    kv_bytes: int
    activation_bytes: int
    max_model_len: int
    num_seqs: int
    lora_bytes: int = 0  # LoRA adapters held on the device: max_loras of them at max_lora_rank
    max_loras: int = 0
    lora_rank: int = 0
    vision_weight_bytes: int = 0  # the vision tower: whole on every tensor-parallel rank
    max_images: int = 0  # images one sequence attends to (its cross-attention keys: x kv_bytes_per_image)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes + self.lora_bytes

    def replicated_bytes(self, num_gpus: int, mode: str) -> int:
        """What tensor parallelism holds more than once: the vision tower on every rank but the first."""
        return (num_gpus - 1) * self.vision_weight_bytes if mode == "tensor" else 0

    def needed_bytes(self, num_gpus: int, mode: str = "layers") -> int:
        return self.total_bytes + num_gpus * CUDA_CONTEXT_BYTES + self.replicated_bytes(num_gpus, mode)


def weight_bytes_per_param(dtype: str, quantization: str) -> tuple[float, float]:
    """(bytes per quantizable layer weight, bytes per embedding/head weight)."""
    base = DTYPE_BYTES[dtype]
    return (QUANT_BYTES[quantization] or base), base


def budget(
    shape: ModelShape,
    *,
    dtype: str,
    quantization: str = "none",
    max_model_len: int,
    num_seqs: int = MIN_POOL_SEQUENCES,
    max_images: int = 1,
    max_loras: int = 0,
    lora_rank: int = 0,
    bitsandbytes: bool = False,
) -> Budget:
    """`bitsandbytes`: the quantization happens at load through bitsandbytes (the transformers engine),
    which replaces nn.Linear layers only: a mixture's routed experts stay in `dtype`."""
    layer_b, embed_b = weight_bytes_per_param(dtype, quantization)
    heads = 1 if shape.tied else 2
    embed_params = heads * shape.embed_params + shape.hidden_size
    kept = shape.routed_expert_params if bitsandbytes else 0  # at dtype despite the quantization
    weights = (shape.num_params - embed_params - kept) * layer_b + (embed_params + kept) * embed_b
    kv_size = shape.num_kv_heads * shape.head_dim * 2 * DTYPE_BYTES[dtype]
    per_token = int((shape.num_layers - shape.num_cross_layers) * kv_size)
    per_image = int(shape.num_cross_layers * kv_size * shape.image_kv_tokens)
    kv = num_seqs * (max_model_len * per_token + max_images * per_image)
    return Budget(
        dtype=dtype,
        quantization=quantization,
        num_params=shape.num_params,
        weight_bytes=int(weights),
        kv_bytes_per_token=per_token,
        kv_bytes_per_image=per_image,
        kv_bytes=kv,
        activation_bytes=int(ACTIVATION_FRACTION * weights),
        max_model_len=max_model_len,
        num_seqs=num_seqs,
        lora_bytes=max_loras * lora_adapter_bytes(shape, lora_rank, dtype),
        max_loras=max_loras,
        lora_rank=lora_rank,
        vision_weight_bytes=int(shape.vision_params * layer_b),
        max_images=max_images,
    )


def lora_adapter_bytes(shape: ModelShape, rank: int, dtype: str) -> int:
    """One adapter's device slot at `rank`: A and B of every decoder linear (q, k, v, o, gate, up, down;
    any of them may be targeted), in the model's dtype, as the engines pad every adapter to the bound."""
    h, q, kv, inter = (
        shape.hidden_size,
        shape.num_heads * shape.head_dim,
        shape.num_kv_heads * shape.head_dim,
        shape.intermediate_size,
    )
    sides = (h + q) + 2 * (h + kv) + (q + h) + 3 * (h + inter)
    return int(shape.num_layers * rank * sides * DTYPE_BYTES[dtype])


def usable_bytes(num_gpus: int, gpu: GpuKind, utilization: float) -> int:
    """What the engine may fill on `num_gpus` GPUs: their memory x limits.gpu_memory_utilization."""
    return int(num_gpus * gpu.memory_bytes * utilization)


def fits(need: Budget, num_gpus: int, gpu: GpuKind, utilization: float = 0.9, mode: str = "layers") -> bool:
    """The pool rule on an even split: what is usable less weights (the vision tower on every rank in
    tensor mode), activations and CUDA contexts leaves KV for `need.num_seqs` sequences at full context
    (kv_pool_tokens >= that)."""
    return need.needed_bytes(num_gpus, mode) <= usable_bytes(num_gpus, gpu, utilization)


def tp_divides(shape: ModelShape, size: int) -> str | None:
    """Why `size` ranks cannot split the heads, or None when they can."""
    for what, heads in (("attention", shape.num_heads), ("KV", shape.num_kv_heads)):
        if heads % size:
            return f"{size} does not divide the {heads} {what} heads"
    if shape.vision_heads and shape.vision_heads % size:
        return f"{size} does not divide the {shape.vision_heads} vision heads"
    return None


def min_gpus(
    need: Budget, gpu: GpuKind, shape: ModelShape, mode: Mode, utilization: float = 0.9, limit: int = 64
) -> int | None:
    """The fewest GPUs of this kind that hold the budget in `mode`, or None above `limit`."""
    for n in range(1, limit + 1):
        if fits(need, n, gpu, utilization, mode) and (mode == "layers" or tp_divides(shape, n) is None):
            return n
    return None
