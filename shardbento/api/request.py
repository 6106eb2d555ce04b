"""The one request object every front end hands to Serving, and what Serving hands back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from shardbento.engine.base import (
    ChatMessage,
    Constraint,
    Delta,
    FinishReason,
    Prompt,
    SamplingParams,
    TokenLogprob,
)
from shardbento.reasoning import Reasoning
from shardbento.toolcalls import FunctionTool, ParsedCall, ToolParser

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
    constraint: Constraint | None = None  # response_format (a tool_choice that forces a call wins)
    prompt_logprobs: int | None = None  # None: off; N: each prompt token's logprob plus N alternatives
    adapter: str | None = None  # a LoRA adapter's name (the /v1 `model`, the typed APIs' `adapter`)


@dataclass(frozen=True, slots=True)
class Tools:
    """The tools a chat request offers: `choice` is "none", "auto", "required" or one tool's name."""

    tools: tuple[FunctionTool, ...]
    choice: str = "auto"
    parallel: bool = True

    @property
    def forced(self) -> tuple[FunctionTool, ...]:
        """The tools a call must be made to (all for "required", the named one), else none."""
        if self.choice == "required":
            return self.tools
        return tuple(t for t in self.tools if t.name == self.choice)


@dataclass(frozen=True, slots=True)
class ToolUse:
    """How a started generation's output turns into calls: its family's parser and the offered tools."""

    parser: ToolParser
    tools: Tools


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation as a front end parsed it: chat `messages` (rendered with the chat template) or a
    raw `prompt` (text or token ids, no template), how to sample, and the id logs and responses carry.

    `sampling.constraint` carries response_format; `tools` what the template lists and the parser reads.
    """

    request_id: str
    sampling: Sampling
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | tuple[int, ...] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables for the chat template
    tools: Tools | None = None
    reasoning_effort: str | None = None  # a thinking model's template variable (refused for others)

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
    tool_use: ToolUse | None = None  # set when the output may hold tool calls
    reasoning: Reasoning | None = None  # set when the model's reasoning is split from its answer


@dataclass(slots=True)
class Completion:
    """A whole (non-streamed) answer."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ParsedCall] = field(default_factory=list)  # then `text` is the content around them
    reasoning: str | None = None  # a thinking model's reasoning (then `text` is the answer alone)
    reasoning_tokens: int = 0  # tokens generated before the reasoning ended
    prompt_logprobs: list[TokenLogprob] | None = None  # the prompt's, when asked (None for its first)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
