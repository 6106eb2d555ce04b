"""The one Plan of a deployment: its mode, devices, memory budget and per-GPU layout, and how to print it.

Built once at startup (preflight) from the spec and the devices this process sees, logged, and then
used as it is: placement turns its layer split into the device map, the engine sizes its batch from it.
`python -m shardbento plan` builds the same object offline for a declared GPU kind.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from shardbento.catalog import ModelSpec, ServingEngine, ServingLimits
from shardbento.plan.kvpool import KVPool, kv_pool
from shardbento.plan.memory import (
    ACTIVATION_FRACTION,
    CUDA_CONTEXT_BYTES,
    DTYPE_BYTES,
    GIB,
    NATIVE_BF16_CAPABILITY,
    QUANT_BYTES,
    VLLM_QUANT,
    Budget,
    GpuKind,
    ModelShape,
    PlanError,
    budget,
    fits,
    min_gpus,
    tp_divides,
    usable_bytes,
)
from shardbento.plan.split import GpuShare, balanced_split

PlanMode = Literal["single", "layers", "tensor"]


@dataclass(frozen=True, slots=True)
class Plan:
    """How one model is served here. `gpu` and `budget` are None on CPU and for a model with no
    config.json to plan from; `shares` is the per-GPU layout of a layer split, else empty."""

    model: str
    mode: PlanMode
    reason: str
    device: Literal["cpu", "cuda"]
    world_size: int  # GPUs, or CPU tensor-parallel ranks
    max_num_seqs: int  # sequences the engine batches (its KV slots)
    max_model_len: int
    gpu: GpuKind | None = None
    budget: Budget | None = None
    min_gpus_layers: int | None = None
    min_gpus_tensor: int | None = None
    shares: tuple[GpuShare, ...] = ()
    notes: tuple[str, ...] = ()
    kv_pool_tokens: int | None = None  # the pool the transformers engine allocates, by the same rule
    kv_pool_source: str = ""
    image_rows: int = 0  # image sequences the cross-attention state holds at once (Mllama), by the same rule
    gpu_memory_utilization: float = 0.9  # the spec's limit: what fits and the pool are measured against
    engine: ServingEngine = "transformers"

    @property
    def num_gpus(self) -> int:
        return self.world_size if self.device == "cuda" else 0

    def per_gpu_bytes(self) -> list[int]:
        """Weights, KV cache and headroom each GPU holds (tensor: an even share of the language model and
        the whole vision tower; layers: its layers)."""
        if self.budget is None:
            return []
        extra = self.budget.kv_bytes + self.budget.activation_bytes
        if self.mode != "layers":
            vision = self.budget.vision_weight_bytes if self.mode == "tensor" else 0
            share = (self.budget.total_bytes - vision) // self.num_gpus + vision
            return [share + CUDA_CONTEXT_BYTES] * self.num_gpus
        total_w = sum(s.weight_bytes for s in self.shares) or 1
        return [s.weight_bytes + extra * s.weight_bytes // total_w + CUDA_CONTEXT_BYTES for s in self.shares]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.gpu is not None:
            data["gpu"] = {"name": self.gpu.name, "memory_gib": round(self.gpu.memory_bytes / GIB, 1)}
        data["num_gpus"] = self.num_gpus
        data["needed_bytes"] = self.budget.needed_bytes(self.num_gpus, self.mode) if self.budget else None
        data["per_gpu_bytes"] = self.per_gpu_bytes()
        return data


def unplanned(spec: ModelSpec, mode: PlanMode, reason: str, notes: tuple[str, ...] = ()) -> Plan:
    """A Plan without memory figures: on CPU, or for a model with no config.json to plan from."""
    return Plan(
        model=spec.name,
        mode=mode,
        reason=reason,
        device="cpu" if spec.num_gpus == 0 else "cuda",
        world_size=spec.world_size,
        max_num_seqs=spec.limits.max_num_seqs,
        max_model_len=spec.max_model_len,
        notes=notes,
    )


def choose_mode(parallel: str, num_gpus: int, shape: ModelShape, tp_capable: bool) -> tuple[PlanMode, str]:
    """(mode, why) for `num_gpus`; `parallel: tensor` that cannot work raises with the sizes that would."""
    if num_gpus <= 1:
        return "single", "one device"
    why_not = tp_divides(shape, num_gpus) or (None if tp_capable else "no tensor-parallel plan for it")
    if parallel == "tensor":
        if why_not:
            fix = _tp_fix(shape) if tp_capable else "set parallel: layers"  # no size helps without a TP plan
            raise PlanError(f"parallel: tensor with gpus: {num_gpus} cannot work: {why_not}; {fix}")
        return "tensor", f"parallel: tensor over {num_gpus} ranks"
    if parallel == "auto" and why_not is None:
        return "tensor", f"auto: {num_gpus} divides the heads and a tensor-parallel plan exists"
    return "layers", "parallel: layers" if parallel == "layers" else f"auto: layer split ({why_not})"


def _tp_fix(shape: ModelShape) -> str:
    sizes = [n for n in range(2, 17) if tp_divides(shape, n) is None]
    return f"set gpus to one of {sizes} or parallel: layers" if sizes else "set parallel: layers"


def plan_spec(
    spec: ModelSpec,
    shape: ModelShape,
    gpu: GpuKind,
    *,
    num_gpus: int | None = None,
    dtype: str | None = None,
    max_model_len: int | None = None,
    tp_capable: bool = True,
    check: bool = True,
    notes: tuple[str, ...] = (),
    engine: ServingEngine = "transformers",
) -> Plan:
    """Plan `spec` on `num_gpus` (default: the spec's) GPUs of `gpu` for `engine` (vLLM: its own
    quantization and memory share, tensor parallel over every GPU); raises PlanError when it cannot work."""
    dtype = dtype or (spec.dtype if spec.dtype != "auto" else "bfloat16")
    if dtype == "bfloat16" and gpu.capability < NATIVE_BF16_CAPABILITY:
        dtype = "float16"  # what the engine falls back to on pre-Ampere GPUs
    context = max_model_len or spec.max_model_len
    limits = engine_limits(spec, engine)
    need = budget(
        shape,
        dtype=dtype,
        quantization=shape.checkpoint_quantization or engine_quantization(spec, engine),
        max_model_len=context,
        max_images=spec.max_images if spec.kind == "vision" else 0,
        max_loras=spec.max_loras if spec.lora_adapters else 0,
        lora_rank=spec.max_lora_rank,
        bitsandbytes=engine == "transformers" and not shape.checkpoint_quantization,
    )
    count = num_gpus or max(spec.gpus, 1)
    utilization = limits.gpu_memory_utilization
    lowest_layers = min_gpus(need, gpu, shape, "layers", utilization) if engine == "transformers" else None
    lowest_tensor = min_gpus(need, gpu, shape, "tensor", utilization) if tp_capable else None
    mode, reason = choose_mode(engine_parallel(spec, engine), count, shape, tp_capable)
    if check and not fits(need, count, gpu, utilization, mode):
        raise PlanError(
            _memory_message(
                spec, need, count, gpu, utilization, (lowest_layers, lowest_tensor), shape, engine
            )
        )
    shares = tuple(balanced_split(need, shape, gpu, count, utilization)) if mode == "layers" else ()
    pool = _pool(limits, need, shape, gpu, count, shares, context, mode)
    return Plan(
        engine=engine,
        model=spec.name,
        mode=mode,
        reason=reason,
        device="cuda",
        world_size=count,
        max_num_seqs=spec.limits.max_num_seqs,
        max_model_len=context,
        gpu=gpu,
        budget=need,
        min_gpus_layers=lowest_layers,
        min_gpus_tensor=lowest_tensor,
        shares=shares,
        notes=notes,
        kv_pool_tokens=pool.tokens,
        kv_pool_source=pool.source,
        image_rows=pool.image_rows,
        gpu_memory_utilization=utilization,
    )


def engine_limits(spec: ModelSpec, engine: ServingEngine) -> ServingLimits:
    """The limits memory is planned with: vLLM's own memory share (it sizes its own KV cache)."""
    if engine == "transformers":
        return spec.limits
    vllm = {"gpu_memory_utilization": spec.vllm.gpu_memory_utilization, "kv_cache_tokens": None}
    return spec.limits.model_copy(update=vllm)


def engine_quantization(spec: ModelSpec, engine: ServingEngine) -> str:
    """How the engine stores the linear layers' weights (a key of plan.memory.QUANT_BYTES)."""
    if engine == "transformers":
        return spec.quantization
    return VLLM_QUANT.get((spec.vllm.quantization or "").lower(), "none")


def engine_parallel(spec: ModelSpec, engine: ServingEngine) -> str:
    """The `parallel` setting the engine honours: vLLM is tensor parallel over `gpus` (pipeline stages
    span nodes), the transformers engine does what the entry says."""
    return "tensor" if engine == "vllm" else spec.parallel


def _pool(
    limits: ServingLimits,
    need: Budget,
    shape: ModelShape,
    gpu: GpuKind,
    count: int,
    shares: tuple[GpuShare, ...],
    context: int,
    mode: PlanMode,
) -> KVPool:
    """The KV pool the engine will allocate (plan/kvpool.kv_pool) and the image sequences its
    cross-attention state holds, from estimates of what each GPU has left: its memory x
    gpu_memory_utilization less its weights, their activations and the CUDA context (the engine
    measures these after its warm-up forward)."""
    per_image = need.kv_bytes_per_image * need.max_images
    if shares:
        layers = {
            s.gpu: (s.last_layer - s.first_layer + 1 if s.first_layer is not None else 0) for s in shares
        }
        per_token = {
            s.gpu: need.kv_bytes_per_token * layers[s.gpu] // max(shape.num_layers, 1) for s in shares
        }
        image = {s.gpu: per_image * layers[s.gpu] // max(shape.num_layers, 1) for s in shares}
        weights = {s.gpu: s.weight_bytes for s in shares}
        per_token = {g: b for g, b in per_token.items() if b}
    else:
        per_token = {g: need.kv_bytes_per_token // count for g in range(count)}
        image = {g: per_image // count for g in range(count)}
        vision = need.vision_weight_bytes if mode == "tensor" else 0
        weights = {g: (need.weight_bytes - vision) // count + vision for g in range(count)}
    free = {
        g: int(gpu.memory_bytes * limits.gpu_memory_utilization)
        - int(weights[g] * (1 + ACTIVATION_FRACTION))
        - CUDA_CONTEXT_BYTES
        for g in set(per_token) | set(image)
    }
    return kv_pool(
        limits,
        per_token,
        max_num_seqs=limits.max_num_seqs,
        max_model_len=context,
        free_bytes=free,
        bytes_per_image_seq=image,
    )


def _memory_message(
    spec: ModelSpec,
    need: Budget,
    count: int,
    gpu: GpuKind,
    utilization: float,
    lowest: tuple[int | None, int | None],
    shape: ModelShape,
    engine: ServingEngine = "transformers",
) -> str:
    """What the entry needs against what its GPUs offer, and the fixes that make it fit for its engine:
    more GPUs (in the modes the engine has), or a quantization that engine really runs."""
    layers, tensor = lowest
    fixes = []
    if engine == "vllm" and tensor:
        fixes.append(f"set gpus: {tensor}")
    elif layers:
        fixes.append(
            f"set gpus: {layers}" + (f" (tensor parallel: {tensor})" if tensor and tensor != layers else "")
        )
    fixes += _quantization_fixes(spec, need, shape, count, gpu, engine)
    fixes.append("lower max_model_len" if need.kv_bytes > need.weight_bytes // 4 else "use larger GPUs")
    return (
        f"model {spec.name!r} needs {need.needed_bytes(count) / GIB:.0f} GiB in {need.dtype} "
        f"({need.weight_bytes / GIB:.0f} GiB weights + {need.kv_bytes / GIB:.1f} GiB KV cache for "
        f"{need.num_seqs} x {need.max_model_len} tokens + {need.activation_bytes / GIB:.0f} GiB activations + "
        f"{count} GiB CUDA context); {count} x {gpu.name} declared "
        f"({usable_bytes(count, gpu, utilization) / GIB:.0f} GiB at gpu_memory_utilization {utilization:g}): "
        + " or ".join(fixes)
    )


def _quantization_fixes(
    spec: ModelSpec,
    need: Budget,
    shape: ModelShape,
    count: int,
    gpu: GpuKind,
    engine: ServingEngine,
) -> list[str]:
    """The smallest quantization that makes the budget fit, as the catalog setting, each one an engine
    really runs: vLLM's online fp8, else bitsandbytes' int4 on the transformers engine (the pinned vLLM
    has no bitsandbytes method), which quantizes nn.Linear layers only (a mixture's routed experts stay
    as they are) and cannot be split by tensor parallelism (a layer split quantizes on each GPU)."""
    layers = " and parallel: layers" if count > 1 else ""
    to_transformers = "engine: auto, " if spec.engine == "vllm" else ""
    options = [("int4", f"set {to_transformers}quantization: int4{layers}", "transformers")]
    if engine == "vllm":
        options.insert(0, ("fp8", "set vllm.quantization: fp8", "vllm"))
    for quantization, fix, runs_on in options:
        if QUANT_BYTES[quantization] >= (QUANT_BYTES[need.quantization] or DTYPE_BYTES[need.dtype]):
            continue  # no smaller than what is counted already
        smaller = budget(
            shape,
            dtype=need.dtype,
            quantization=quantization,
            max_model_len=need.max_model_len,
            num_seqs=need.num_seqs,
            bitsandbytes=runs_on == "transformers",
        )
        share = engine_limits(spec, runs_on).gpu_memory_utilization
        if fits(smaller, count, gpu, share, "layers" if runs_on == "transformers" else "tensor"):
            return [fix]
    return []


def render(plan: Plan) -> str:
    """The human table: the budget, the chosen mode and what goes on each GPU."""
    need = plan.budget
    if need is None or plan.gpu is None:
        where = f"{plan.world_size} CPU rank(s)" if plan.device == "cpu" else f"{plan.world_size} GPU(s)"
        lines = [
            f"model      {plan.model}: no memory plan",
            f"mode       {plan.mode} ({plan.reason}) on {where}",
        ]
        return "\n".join(lines + [f"note       {note}" for note in plan.notes])
    lines = [
        f"model      {plan.model}: {need.num_params / 1e9:.2f} B parameters, {need.dtype}"
        + (f", {need.quantization}" if need.quantization != "none" else ""),
        f"weights    {need.weight_bytes / GIB:8.1f} GiB",
        f"KV cache   {need.kv_bytes / GIB:8.1f} GiB  ({need.kv_bytes_per_token / 1024:.0f} KiB/token x "
        f"{need.max_model_len} tokens: the least the KV pool must hold"
        + (
            f" + {need.kv_bytes_per_image / GIB:.2f} GiB/image cross-attention)"
            if need.kv_bytes_per_image
            else ")"
        ),
        f"headroom   {need.activation_bytes / GIB:8.1f} GiB activations + {plan.num_gpus} GiB CUDA context",
        *(
            [
                f"LoRA       {need.lora_bytes / GIB:8.2f} GiB  ({need.max_loras} adapters on the device at rank {need.lora_rank})"
            ]
            if need.max_loras
            else []
        ),
        f"KV pool    {plan.kv_pool_tokens or 0:8d} tokens, {(plan.kv_pool_tokens or 0) * need.kv_bytes_per_token / GIB:.1f} "
        f"GiB in all ({plan.kv_pool_source}): {(plan.kv_pool_tokens or 0) // need.max_model_len} sequences "
        f"at the full {need.max_model_len} tokens",
        *_cross_attention(plan, need),
        f"total      {need.needed_bytes(plan.num_gpus, plan.mode) / GIB:8.1f} GiB on {plan.num_gpus} x {plan.gpu.name} "
        f"({usable_bytes(plan.num_gpus, plan.gpu, plan.gpu_memory_utilization) / GIB:.0f} GiB usable)",
        f"min GPUs   layers: {plan.min_gpus_layers or '-'}, tensor: {plan.min_gpus_tensor or '-'}",
        f"engine     {plan.engine}",
        f"mode       {plan.mode} ({plan.reason})",
        "",
        f"{'GPU':<4} {'GiB':>7}  holds",
    ]
    for gpu, used in enumerate(plan.per_gpu_bytes()):
        lines.append(f"{gpu:<4} {used / GIB:7.1f}  {_holds(plan, gpu)}")
    return "\n".join(lines + [f"note       {note}" for note in plan.notes])


def _cross_attention(plan: Plan, need: Budget) -> list[str]:
    """The cross-attention state's line (Mllama): image sequences at once, what each takes, all of it."""
    if not plan.image_rows:
        return []
    per_seq = need.kv_bytes_per_image * need.max_images
    limit = "every slot" if plan.image_rows >= plan.max_num_seqs else "at most half the KV memory"
    return [
        f"cross-attn {plan.image_rows:8d} image sequences at once ({limit}) x {per_seq / GIB:.2f} GiB "
        f"= {plan.image_rows * per_seq / GIB:.1f} GiB in all, beside the KV pool"
    ]


def _holds(plan: Plan, gpu: int) -> str:
    if plan.mode == "single":
        return "all weights and its KV cache"
    if plan.mode == "tensor":
        vision = ", the whole vision tower" if plan.budget and plan.budget.vision_weight_bytes else ""
        return f"1/{plan.num_gpus} of every layer{vision} and its KV cache"
    share = plan.shares[gpu]
    layers = (
        f"layers {share.first_layer}-{share.last_layer}" if share.first_layer is not None else "no layers"
    )
    return ", ".join([*share.other, layers])
