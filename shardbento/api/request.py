"""The one request object every front end hands to Serving, and what Serving hands back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from shardbento.engine.base import ChatMessage, Delta, FinishReason, Prompt, SamplingParams, TokenLogprob

# What a torch.Generator takes as a seed; past it sampling would fail with an overflow (a 500).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


@dataclass(frozen=True, slots=True)
class Sampling:
    """The sampling fields as the client sent them; None means the catalog entry's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])
    min_p: float | None = None
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; N: the chosen token plus N alternatives


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation as a front end parsed it: chat `messages` (rendered with the chat template) or a
    raw `prompt` (text or token ids, no template), how to sample, and the id logs and responses carry.

    Output constraints (response_format, tools) join here as fields of their own.
    """

    request_id: str
    sampling: Sampling
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | tuple[int, ...] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables for the chat template

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a GenerationRequest has either messages or a prompt")


@dataclass(slots=True)
class Generation:
    """A started generation: the rendered prompt, the merged parameters, and the engine's deltas.

    Serving awaits the first delta before handing it out, so a refusal or failure before any output
    (429 at capacity, 503, a failed first step) is a plain HTTP error, never a 200 stream cut short.
    """

    request_id: str
    prompt: Prompt
    params: SamplingParams
    deltas: AsyncIterator[Delta]


@dataclass(slots=True)
class Completion:
    """A whole (non-streamed) answer."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
