"""The layer split: the model's blocks filled onto GPUs as accelerate would, and that split as a device map
over the checkpoint's own module names, so what `plan` prints is what loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shardbento.plan.memory import (
    CUDA_CONTEXT_BYTES,
    GIB,
    Budget,
    GpuKind,
    ModelShape,
    PlanError,
    weight_bytes_per_param,
)


@dataclass(frozen=True, slots=True)
class GpuShare:
    gpu: int
    first_layer: int | None
    last_layer: int | None
    other: tuple[str, ...]
    weight_bytes: int


@dataclass(slots=True)
class _Fill:
    blocks: list[tuple[str, int]] = field(default_factory=list)


def layer_blocks(shape: ModelShape, dtype: str, quantization: str) -> list[tuple[str, int]]:
    """The model as accelerate walks it: vision tower, embeddings, decoder layers, norm, lm_head."""
    layer_b, embed_b = weight_bytes_per_param(dtype, quantization)
    blocks: list[tuple[str, int]] = []
    if shape.vision_params:
        blocks.append(("vision", int(shape.vision_params * layer_b)))
    blocks.append(("embed", int(shape.embed_params * embed_b)))
    blocks += [(f"layer.{i}", int(shape.layer_params_at(i) * layer_b)) for i in range(shape.num_layers)]
    blocks.append(("norm", int(shape.hidden_size * embed_b)))
    if not shape.tied:
        blocks.append(("lm_head", int(shape.embed_params * embed_b)))
    return blocks


def split_layers(blocks: list[tuple[str, int]], max_memory: list[int]) -> list[GpuShare]:
    """Fill GPUs in order like accelerate.infer_auto_device_map: GPU 0 keeps room for the largest
    block (its buffer for offloaded layers); a block that does not fit moves to the next GPU."""
    largest = max(size for name, size in blocks if name != "vision")
    fills = [_Fill() for _ in max_memory]
    gpu, used = 0, 0
    for name, size in blocks:
        while True:
            room = max_memory[gpu] - (largest if gpu == 0 else 0)
            if used + size <= room or gpu == len(max_memory) - 1:
                break
            gpu, used = gpu + 1, 0
        if used + size > max_memory[gpu] - (largest if gpu == 0 else 0):
            raise PlanError(f"{name} ({size / GIB:.1f} GiB) does not fit on any of {len(max_memory)} GPU(s)")
        fills[gpu].blocks.append((name, size))
        used += size
    return [_share(i, fill.blocks) for i, fill in enumerate(fills)]


def _share(gpu: int, blocks: list[tuple[str, int]]) -> GpuShare:
    layers = [int(name.split(".")[1]) for name, _ in blocks if name.startswith("layer.")]
    return GpuShare(
        gpu=gpu,
        first_layer=min(layers) if layers else None,
        last_layer=max(layers) if layers else None,
        other=tuple(name for name, _ in blocks if not name.startswith("layer.")),
        weight_bytes=sum(size for _, size in blocks),
    )


def balanced_split(
    need: Budget, shape: ModelShape, gpu: GpuKind, count: int, utilization: float = 0.9
) -> list[GpuShare]:
    """Like accelerate's get_balanced_memory: cap every GPU but the last near an even share of weights,
    within gpu_memory_utilization and after the per-GPU headroom (CUDA context, its share of the least
    KV the pool must hold and of the activations), so every GPU keeps room for its part of the pool."""
    blocks = layer_blocks(shape, need.dtype, need.quantization)
    usable = (
        int(gpu.memory_bytes * utilization)
        - CUDA_CONTEXT_BYTES
        - (need.kv_bytes + need.activation_bytes) // count
    )
    even = sum(size for _, size in blocks) // count + max(size for _, size in blocks)
    return split_layers(blocks, [min(usable, even)] * (count - 1) + [usable])


def device_map_from_shares(shares: tuple[GpuShare, ...], model: Any) -> dict[str, int]:
    """The plan's split in the model's module names (a model built on the meta device will do).

    The text model is the input embedding's parent: its decoder-layer list is split as the shares say,
    its other children (final norm, rotary tables) go with "norm". Everything outside it (vision tower,
    projector) goes with "vision"; the output head with "lm_head", or with the embedding it is tied to.
    """
    where = {block: share.gpu for share in shares for block in share.other}
    layer_gpu = {
        i: share.gpu
        for share in shares
        if share.first_layer is not None
        for i in range(share.first_layer, share.last_layer + 1)
    }
    names = {id(module): name for name, module in model.named_modules()}
    embed = names[id(model.get_input_embeddings())]
    head_module = model.get_output_embeddings()
    head = names.get(id(head_module)) if head_module is not None else None
    text = embed.rpartition(".")[0]
    layers = _decoder_layers(model.get_submodule(text), text, len(layer_gpu))
    outside = where.get("vision", where["norm"])
    device_map: dict[str, int] = {}
    for ancestor in _ancestors(text):
        module = model.get_submodule(ancestor)
        for child, _ in module.named_children():
            full = _join(ancestor, child)
            if full == embed:
                device_map[full] = where["embed"]
            elif full == layers:
                device_map.update({f"{layers}.{i}": gpu for i, gpu in layer_gpu.items()})
            elif full == head:
                device_map[full] = where.get("lm_head", where["embed"])
            elif full not in _ancestors(text):
                device_map[full] = where["norm"] if ancestor == text else outside
        for own, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            device_map[_join(ancestor, own)] = where["norm"] if ancestor == text else outside
    return device_map


def _decoder_layers(text_model: Any, text: str, num_layers: int) -> str:
    for child, module in text_model.named_children():
        if type(module).__name__ == "ModuleList" and len(module) == num_layers:
            return _join(text, child)
    raise PlanError(f"{text or 'the model'} has no list of {num_layers} decoder layers to split")


def _ancestors(name: str) -> list[str]:
    """'' then each dotted prefix of `name`, `name` included: the modules on the way to it."""
    parts = name.split(".") if name else []
    return [""] + [".".join(parts[: i + 1]) for i in range(len(parts))]


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child
