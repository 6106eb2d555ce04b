"""Startup checks before a weight loads: GPU count, kernels for this GPU, dtype, memory, the layout."""

from __future__ import annotations

import importlib.util
import logging

from shardbento.catalog import ModelSpec, ServingEngine
from shardbento.plan.cuda import capability_refusal, driver_cuda, driver_refusal, driver_version, parse_cuda
from shardbento.plan.memory import (
    GIB,
    NATIVE_BF16_CAPABILITY,
    GpuKind,
    PlanError,
    load_config,
    model_shape,
    parse_gpus,
)
from shardbento.plan.sharding import Plan, choose_mode, engine_parallel, plan_spec, render, unplanned
from shardbento.plan.source import config_path
from shardbento.plan.tp_plan import tp_plan_available
from shardbento.thudm.layout import CheckpointError, is_thudm, loader_decision, translate_device_map

logger = logging.getLogger(__name__)


def run_preflight(spec: ModelSpec, engine: ServingEngine = "transformers") -> Plan:
    """The Plan for this spec on the devices this process sees, for the engine that will serve it (vLLM
    counts vllm.quantization and vllm.gpu_memory_utilization); raises PlanError, with the numbers and
    the fix, when the spec cannot work here. Nothing is loaded yet."""
    try:
        config = load_config(config_path(spec))
    except PlanError as exc:  # a hub model without a shipped config.json: load as the spec says, unplanned
        logger.warning("model %s: no sharding plan (%s)", spec.name, exc)
        mode = "tensor" if spec.parallel == "tensor" else ("layers" if spec.world_size > 1 else "single")
        return unplanned(spec, mode, f"parallel: {spec.parallel}, no config.json to plan from", (str(exc),))
    loader = check_loader(spec, config, engine)
    shape = model_shape(config)
    tp_capable = engine == "vllm" or tp_plan_available(config)
    mode, reason = choose_mode(engine_parallel(spec, engine), spec.world_size, shape, tp_capable)
    if spec.quantization != "none" and mode == "tensor" and engine == "transformers":
        raise PlanError(
            f"quantization: {spec.quantization} with parallel: tensor cannot work on the transformers "
            f"engine ({spec.world_size} {'GPUs' if spec.num_gpus else 'CPU ranks'}): bitsandbytes weights "
            "cannot be split by transformers' tensor-parallel plan; set parallel: layers (a layer split "
            "quantizes on each GPU) or engine: vllm with vllm.quantization (fp8, awq, gptq, ...)"
        )
    if spec.num_gpus == 0:
        plan = unplanned(spec, mode, reason, (loader,))
        logger.info("model %s plan:\n%s", spec.name, render(plan))
        return plan
    import torch

    notes = (loader, *_check_gpus(spec, torch))
    plan = plan_spec(
        spec, shape, _visible_kind(torch, spec), tp_capable=tp_capable, notes=notes, engine=engine
    )
    logger.info("model %s plan:\n%s", spec.name, render(plan))
    return plan


def check_loader(spec: ModelSpec, config: dict, engine: ServingEngine = "transformers") -> str:
    """How the checkpoint loads (class, tokenizer), as a plan note; raises PlanError, with the reason and
    the fix, for a checkpoint nothing here can load and for a device_map naming no module of it."""
    if engine == "vllm":
        return "loader: vLLM's own model for this architecture"
    try:
        decision = loader_decision(config, spec.kind, spec.trust_remote_code)
        if spec.device_map is not None and is_thudm(config):
            translate_device_map(dict(spec.device_map), config["num_layers"])
    except CheckpointError as exc:
        raise PlanError(f"model {spec.name!r} cannot load: {exc}") from None
    if decision.kind == "chatglm":
        _check_importable("safetensors", "the THUDM checkpoint's conversion reads safetensors shards")
    return decision.render()


def _check_importable(module: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise PlanError(f"{module} is not installed ({why}); install env/cpu.txt or env/cuda.txt")


def _check_gpus(spec: ModelSpec, torch: object) -> list[str]:
    """The driver vs this torch's CUDA, visible GPUs vs `gpus`, compute capability vs this torch build,
    bf16, flash-attention, P2P."""
    cuda = torch.cuda  # type: ignore[attr-defined]
    build = parse_cuda(torch.version.cuda)  # type: ignore[attr-defined]
    supported = driver_cuda()
    refusal = driver_refusal(build, supported, driver_version())
    if refusal is not None:
        raise PlanError(f"model {spec.name!r} declares gpus: {spec.gpus}, but {refusal}")
    visible = cuda.device_count() if cuda.is_available() else 0
    if visible < spec.gpus:
        raise PlanError(
            f"model {spec.name!r} declares gpus: {spec.gpus} but this process sees {visible} GPU(s)"
            + _why_no_gpus(visible, build, supported)
            + f"; set gpus: {visible} if the model fits (python -m shardbento plan {spec.name}), "
            "or use a larger machine"
        )
    notes = []
    arch_list = cuda.get_arch_list()
    for index in range(spec.gpus):
        major, minor = cuda.get_device_capability(index)
        name = cuda.get_device_name(index)
        if arch_list and f"sm_{major}{minor}" not in arch_list and not _ptx_covers(arch_list, major, minor):
            fix = capability_refusal(f"GPU {index} ({name})", (major, minor), build)
            raise PlanError(
                f"GPU {index} ({name}) has compute capability {major}.{minor} but this torch build has kernels "
                f"for {', '.join(arch_list)} only: "
                + (fix or f"install a torch build that lists sm_{major}{minor}")
            )
        if (major, minor) < NATIVE_BF16_CAPABILITY and spec.dtype in ("bfloat16", "auto"):
            notes.append(f"GPU {index} ({name}) predates Ampere: bfloat16 falls back to float16")
    if importlib.util.find_spec("flash_attn") is None:
        notes.append("flash-attention is not installed: attention runs on PyTorch SDPA")
    if spec.gpus > 1:
        peers = [cuda.can_device_access_peer(0, i) for i in range(1, spec.gpus)]
        notes.append(f"peer-to-peer access from GPU 0: {peers} (False means copies go through the host)")
    return notes


def _why_no_gpus(visible: int, build: tuple[int, int] | None, supported: tuple[int, int] | None) -> str:
    if build is None:
        return " (this torch is a CPU build: GPU images install env/cuda.lock.txt or env/vllm-cuda.lock.txt)"
    if visible == 0 and supported is None:
        return (
            " (no NVIDIA driver is loaded in this process: libcuda.so.1 was not found; run the container "
            "with the NVIDIA container toolkit, e.g. docker run --gpus all)"
        )
    return " (CUDA_VISIBLE_DEVICES and the GPUs BentoML allocated decide)"


def _ptx_covers(arch_list: list[str], major: int, minor: int) -> bool:
    """A compute_XY entry runs (JIT) on any GPU of capability >= X.Y."""
    ptx = [a.removeprefix("compute_") for a in arch_list if a.startswith("compute_")]
    return any((int(v[:-1]), int(v[-1])) <= (major, minor) for v in ptx if v.isdigit())


def _visible_kind(torch: object, spec: ModelSpec) -> GpuKind:
    """The GPUs as they are (smallest memory of the ones used), or the declared gpu_type."""
    cuda = torch.cuda  # type: ignore[attr-defined]
    if cuda.is_available():
        props = [cuda.get_device_properties(i) for i in range(spec.gpus)]
        smallest = min(props, key=lambda p: p.total_memory)
        name = f"{smallest.name} ({smallest.total_memory / GIB:.0f} GiB)"
        return GpuKind(name, smallest.total_memory, (smallest.major, smallest.minor))
    return parse_gpus(spec.gpu_type or "A100-80GB")[1]
