"""Text in, token ids out: a checkpoint's tokenizer (and processor), chat template and EOS ids, no weights."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import jinja2
import torch

from shardbento.catalog import ModelSpec
from shardbento.engine.base import ChatMessage, Constraint, Prompt, SamplingParams
from shardbento.engine.batch.sampler import RequestSampler
from shardbento.engine.grammar import Grammars
from shardbento.errors import InvalidRequest
from shardbento.reasoning import detect_reasoning_parser
from shardbento.toolcalls import detect_tool_parser


def image_digest(inputs: dict[str, Any]) -> int:
    """A prompt's images as a number that roots its prefix-cache chain: the pixels' bytes, hashed."""
    hasher = hashlib.blake2b(digest_size=8)
    for name in sorted(k for k, v in inputs.items() if isinstance(v, torch.Tensor) and k != "input_ids"):
        if name != "attention_mask":
            hasher.update(name.encode())
            hasher.update(inputs[name].contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(hasher.digest(), "little") or 1


_STRING_TEST = re.compile(r"content(?:'\]|\"\]|)\s+is\s+string")


def takes_string_content(template: str | None) -> bool:
    """Whether a chat template renders a message whose content is a plain string (it tests for one, as
    Llama 3.2 Vision's, Qwen2-VL's and LLaVA's do); else every message goes as content parts."""
    return template is None or _STRING_TEST.search(template) is not None


def collect_eos_ids(generation_config: Any, config: Any, tokenizer: Any, spec: ModelSpec) -> set[int]:
    """Every EOS id the generation config (else the model config), the tokenizer and the spec name."""
    ids: set[int] = set(spec.eos_token_ids)
    for source in (generation_config, config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
            break
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@dataclass(frozen=True)
class Preprocessor:
    """What every engine needs before the weights: prompts rendered and tokenized, tokens named, ends known.

    The transformers engine holds one beside its weights; the tensor-parallel and vLLM engines, whose
    weights live in other processes, hold only this.
    """

    spec: ModelSpec
    tokenizer: Any
    processor: Any | None
    eos_token_ids: frozenset[int]
    embedding_rows: int  # the input embedding's rows: ids past them would index out of range
    grammars: Grammars  # constrained decoding over this tokenizer (built on first use)

    @property
    def vocab_size(self) -> int:
        """Ids a prompt may hold: known to the tokenizer and inside the embedding (padded rows excluded)."""
        return min(len(self.tokenizer), self.embedding_rows)

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, else the smallest EOS id (batched generate() needs one)."""
        pad_id = self.tokenizer.pad_token_id
        return pad_id if pad_id is not None else min(self.eos_token_ids)

    @property
    def chat_template(self) -> str | None:
        template = self.spec.chat_template or getattr(self.processor or self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None

    @property
    def tool_parser(self) -> str | None:
        """The catalog's `tool_parser`, else the family the chat template's markers name."""
        return self.spec.tool_parser or detect_tool_parser(self.chat_template)

    @property
    def reasoning_parser(self) -> str | None:
        """The catalog's `reasoning_parser`, else the family the chat template's markers name."""
        return self.spec.reasoning_parser or detect_reasoning_parser(self.chat_template)

    def sampler(self, params: SamplingParams, prompt_ids: tuple[int, ...] = ()) -> RequestSampler:
        """The token picker for one request: its EOS ids, token names for logprobs, its grammar, and
        (for a repetition penalty) its prompt."""
        return RequestSampler(
            params,
            eos_ids=self.eos_token_ids,
            decode=self.token_text,
            grammars=self.grammars,
            prompt_ids=prompt_ids,
        )

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def decode(self, token_ids: list[int]) -> str:
        """The text of these ids, special tokens included (what /detokenize returns, as vLLM's does)."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    def chat_text(self, messages: list[ChatMessage], template_kwargs: dict[str, Any] | None = None) -> str:
        """The chat template's text; with a processor each image is one image token (not yet expanded).
        A message with images is a list of content parts; a text-only one a plain string wherever the
        template takes strings (it tests `content is string`): a template may read a system message as
        text (Meta's Llama 3.2 Vision template trims `messages[0]['content']`).

        A template that refuses the conversation (its `raise_exception`, e.g. roles that must alternate)
        is the request's fault: a 400 with the template's own words.
        """
        extra = {
            **(template_kwargs or {}),
            **({"chat_template": self.spec.chat_template} if self.spec.chat_template else {}),
        }
        conversation = [m.template_dict() for m in messages]
        if self.processor is None:
            render = self.tokenizer.apply_chat_template
        else:
            strings = takes_string_content(self.chat_template)
            for message, m in zip(conversation, messages, strict=True):
                if m.images or not strings:
                    parts = [{"type": "image"}] * len(m.images) + [{"type": "text", "text": m.text}]
                    message["content"] = parts
            render = self.processor.apply_chat_template
        try:
            return render(conversation, add_generation_prompt=True, tokenize=False, **extra)
        except jinja2.TemplateError as exc:
            raise InvalidRequest(
                f"the model's chat template refused the messages: {exc}", param="messages"
            ) from exc

    def render_chat(
        self, messages: list[ChatMessage], template_kwargs: dict[str, Any] | None = None
    ) -> Prompt:
        text = self.chat_text(messages, template_kwargs)
        images = [image for m in messages for image in m.images]
        if self.processor is None or not images:
            return self._tokenize(text, add_special_tokens=False)
        inputs = self.processor(text=text, images=images, return_tensors="pt", add_special_tokens=False)
        token_ids = tuple(int(i) for i in inputs["input_ids"][0])
        digest = image_digest(dict(inputs))
        return Prompt(token_ids=token_ids, inputs=dict(inputs), num_images=len(images), images_digest=digest)

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


class PreprocessorPrompts:
    """The prompt half of the Engine protocol for an engine that holds its Preprocessor as `_prompts`."""

    _prompts: Preprocessor

    @property
    def tokenizer(self) -> Any:
        return self._prompts.tokenizer

    def render_chat(
        self, messages: list[ChatMessage], template_kwargs: dict[str, Any] | None = None
    ) -> Prompt:
        return self._prompts.render_chat(messages, template_kwargs)

    def encode(self, text: str | list[int]) -> Prompt:
        return self._prompts.encode(text)

    def decode(self, token_ids: list[int]) -> str:
        return self._prompts.decode(token_ids)

    def check_constraint(self, constraint: Constraint) -> None:
        self._prompts.grammars.check(constraint)


def preprocessor_class(kind: str) -> Any:
    from transformers import AutoProcessor, AutoTokenizer

    return AutoProcessor if kind == "vision" else AutoTokenizer


def load_preprocessor(
    spec: ModelSpec, path: str, config: Any = None, generation_config: Any = None
) -> Preprocessor:
    """The checkpoint's tokenizer (processor for vision) and EOS ids; `config` and `generation_config`
    are read from `path` unless the caller has them (a loaded model does)."""
    from transformers import AutoConfig, GenerationConfig

    import shardbento.engine.hf.glm4v as glm4v  # registers GLM-4V's converted model type
    from shardbento.engine.hf.chatglm3_tokenizer import load_converted
    from shardbento.engine.hf.processors import QWEN_VL_TYPES, qwen_vl_processor

    common = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    if config is None:
        config = AutoConfig.from_pretrained(path, **common)
        try:
            generation_config = GenerationConfig.from_pretrained(path, **common)
        except OSError:  # no generation_config.json: the model config's EOS ids are the ones
            generation_config = None
    if getattr(config, "model_type", None) == glm4v.MODEL_TYPE:
        from transformers import AutoTokenizer

        preprocessor = glm4v.Glm4vProcessor(AutoTokenizer.from_pretrained(path), config.vision_config)
    elif getattr(config, "model_type", None) in QWEN_VL_TYPES and spec.kind == "vision":
        preprocessor = qwen_vl_processor(path, config.model_type, **common)
    elif (converted := load_converted(path)) is not None:  # ChatGLM3's, with SentencePiece's decoding
        preprocessor = converted
    else:
        preprocessor = preprocessor_class(spec.kind).from_pretrained(path, **common)
    tokenizer = getattr(preprocessor, "tokenizer", preprocessor)
    eos_ids = frozenset(collect_eos_ids(generation_config, config, tokenizer, spec))
    rows = config.get_text_config().vocab_size
    return Preprocessor(
        spec=spec,
        tokenizer=tokenizer,
        processor=preprocessor if spec.kind == "vision" else None,
        eos_token_ids=eos_ids,
        embedding_rows=rows,
        grammars=Grammars(tokenizer, eos_ids, logits_width=rows),
    )
