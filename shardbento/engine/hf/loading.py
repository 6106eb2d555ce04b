"""Loading a catalog model with transformers: weights placed, tokenizer or processor, EOS ids, prompts."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from shardbento.catalog import ModelSpec
from shardbento.engine.base import ChatMessage, Prompt
from shardbento.engine.hf.cpu_kernels import keep_freed_memory, pack_linear_weights
from shardbento.engine.hf.placement import device_map_for, input_device

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_source(spec: ModelSpec) -> str:
    """A path or hub id for from_pretrained; generated models are built on first use."""
    if spec.is_generated:
        from shardbento.tiny.models import ensure_generated

        return str(ensure_generated(spec.recipe))
    return spec.source


def resolve_dtype(spec: ModelSpec) -> torch.dtype:
    if spec.dtype != "auto":
        return _DTYPES[spec.dtype]
    if spec.gpus == 0:
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def collect_eos_ids(model: Any, tokenizer: Any, spec: ModelSpec) -> set[int]:
    """Every EOS id the generation config, the tokenizer and the spec name."""
    ids: set[int] = set(spec.eos_token_ids)
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
            break
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@dataclass
class LoadedModel:
    """A model with its tokenizer (and processor for vision) and what generation needs to know."""

    spec: ModelSpec
    model: Any
    tokenizer: Any
    processor: Any | None
    eos_token_ids: set[int]
    input_device: torch.device
    devices: tuple[str, ...]
    parallel: str

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, else the smallest EOS id (batched generate() needs one)."""
        pad_id = self.tokenizer.pad_token_id
        return pad_id if pad_id is not None else min(self.eos_token_ids)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _template_kwargs(self) -> dict[str, Any]:
        return {"chat_template": self.spec.chat_template} if self.spec.chat_template else {}

    def chat_text(self, messages: list[ChatMessage]) -> str:
        """The chat template's text; with a processor each image is one image token (not yet expanded)."""
        if self.processor is None:
            conversation = [{"role": m.role, "content": m.text} for m in messages]
            return self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=False, **self._template_kwargs()
            )
        conversation = [
            {
                "role": m.role,
                "content": [{"type": "image"}] * len(m.images) + [{"type": "text", "text": m.text}],
            }
            for m in messages
        ]
        return self.processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False, **self._template_kwargs()
        )

    def render_chat(self, messages: list[ChatMessage]) -> Prompt:
        text = self.chat_text(messages)
        images = [image for m in messages for image in m.images]
        if self.processor is None or not images:
            return self._tokenize(text, add_special_tokens=False)
        inputs = self.processor(text=text, images=images, return_tensors="pt", add_special_tokens=False)
        token_ids = tuple(int(i) for i in inputs["input_ids"][0])
        return Prompt(token_ids=token_ids, inputs=dict(inputs), num_images=len(images))

    def encode(self, text: str | list[int]) -> Prompt:
        if isinstance(text, str):
            return self._tokenize(text, add_special_tokens=True)
        ids = torch.tensor([text], dtype=torch.long)
        return Prompt(
            token_ids=tuple(text), inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        )

    def _tokenize(self, text: str, add_special_tokens: bool) -> Prompt:
        encoded = self.tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens)
        token_ids = tuple(int(i) for i in encoded["input_ids"][0])
        return Prompt(token_ids=token_ids, inputs=dict(encoded))


def _auto_classes(kind: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    if kind == "vision":
        return AutoModelForImageTextToText, AutoProcessor
    return AutoModelForCausalLM, AutoTokenizer


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load weights where the spec says, with every check that can fail done before the weights."""
    path = resolve_source(spec)
    dtype = resolve_dtype(spec)
    device_map = device_map_for(spec, path, dtype)
    model_class, preprocessor_class = _auto_classes(spec.kind)
    common = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    offload = {"offload_folder": str(Path(path) / ".offload")} if _uses_disk(device_map) else {}
    logger.info("loading %s from %s (%s, device_map=%s)", spec.name, path, dtype, device_map)
    model = model_class.from_pretrained(path, dtype=dtype, device_map=device_map, **common, **offload)
    model.eval()
    if spec.cpu_kernels == "onednn" and any(p.device.type == "cpu" for p in model.parameters()):
        pack_linear_weights(model)
        keep_freed_memory()
    preprocessor = preprocessor_class.from_pretrained(path, **common)
    tokenizer = getattr(preprocessor, "tokenizer", preprocessor)
    eos_ids = collect_eos_ids(model, tokenizer, spec)
    devices = tuple(sorted({str(p.device) for p in model.parameters()}))
    return LoadedModel(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        processor=preprocessor if spec.kind == "vision" else None,
        eos_token_ids=eos_ids,
        input_device=input_device(model),
        devices=devices,
        parallel="layers" if isinstance(device_map, dict) and len(set(device_map.values())) > 1 else "none",
    )


def load_preprocessing(spec: ModelSpec, path: str, parallel: str) -> LoadedModel:
    """Tokenizer (processor for vision), chat template and EOS ids without the weights, for engines whose
    weights live elsewhere (tensor-parallel ranks, vLLM)."""
    from transformers import AutoConfig, GenerationConfig

    _, preprocessor_class = _auto_classes(spec.kind)
    common = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    preprocessor = preprocessor_class.from_pretrained(path, **common)
    tokenizer = getattr(preprocessor, "tokenizer", preprocessor)
    try:
        generation_config = GenerationConfig.from_pretrained(path, **common)
    except OSError:  # no generation_config.json: the model config's EOS ids are the ones
        generation_config = None
    config = AutoConfig.from_pretrained(path, **common)
    holder = SimpleNamespace(generation_config=generation_config, config=config)
    return LoadedModel(
        spec=spec,
        model=None,
        tokenizer=tokenizer,
        processor=preprocessor if spec.kind == "vision" else None,
        eos_token_ids=collect_eos_ids(holder, tokenizer, spec),
        input_device=torch.device("cpu"),
        devices=(),
        parallel=parallel,
    )


def _uses_disk(device_map: str | dict[str, Any]) -> bool:
    return isinstance(device_map, dict) and "disk" in device_map.values()
