"""The typed interface between the HTTP layer and an engine; imports no torch."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

FinishReason = Literal["stop", "length", "tool_calls"]  # the engines end with the first two
GREEDY_BELOW_TEMPERATURE = 1e-5  # as vLLM's sampling epsilon
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Constraint:
    """What the output must match: a JSON schema (its JSON text), any JSON object, a Lark grammar, a
    client's grammar (Lark, or GBNF with `root ::=`), a regex, or one of a choice of strings (their JSON
    list). `param` is the request field it came from, named by the 400 when it cannot be compiled."""

    kind: Literal["json_schema", "json_object", "lark", "grammar", "regex", "choice"]
    source: str = ""
    param: str = "response_format"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request generation settings, already validated and merged with the spec's defaults."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0  # over prompt and output tokens (transformers' and vLLM's meaning)
    presence_penalty: float = 0.0  # subtracted once from every token the output already holds (OpenAI's)
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output so far (OpenAI's)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the raw logits
    min_p: float = 0.0  # after temperature: drop tokens below min_p x the most likely one's probability
    stop_token_ids: tuple[int, ...] = ()  # end the output like EOS ids, even with ignore_eos
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; N: the chosen token plus N alternatives
    constraint: Constraint | None = None  # a grammar the output must match (engine/grammar.py)
    prompt_logprobs: int | None = None  # None: off; N: each prompt token's logprob plus N alternatives
    adapter: str | None = None  # the LoRA adapter the request runs under (None: the base model)

    @property
    def shapes_logits(self) -> bool:
        """Whether anything but the EOS block changes the logits a token is picked from."""
        return bool(
            self.constraint is not None
            or self.repetition_penalty != 1.0
            or self.presence_penalty
            or self.frequency_penalty
            or self.logit_bias
        )

    @property
    def greedy(self) -> bool:
        """Temperatures this small sample the argmax anyway; dividing logits by them overflows."""
        return self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call the assistant made: `arguments` is its JSON object as text (OpenAI's form)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message after validation; `images` are decoded PIL images in content order.

    An assistant turn may carry `tool_calls` (its text then often empty); a `tool` message answers the
    call named by `tool_call_id`.
    """

    role: Literal["system", "user", "assistant", "tool"]
    text: str
    images: tuple[Any, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    reasoning_content: str | None = None  # an earlier assistant turn's reasoning (templates may show it)

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates read it (HF's convention: tool-call arguments as a mapping)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text}
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": json.loads(c.arguments)},
                }
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        if self.reasoning_content is not None:
            message["reasoning_content"] = self.reasoning_content
        return message


@dataclass(frozen=True, slots=True)
class Prompt:
    """A tokenized prompt; `inputs` is the engine's own payload (tensors, pixel values)."""

    token_ids: tuple[int, ...]
    inputs: Any = None
    num_images: int = 0
    images_digest: int = 0  # the images' pixels hashed (prefix caching's key), computed off the event loop

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token's log-probability under the model's raw distribution and the best alternatives there.

    `logprob` is None only for a prompt's first token (nothing predicts it); prompt tokens also carry
    their id, their rank in the distribution (1: the most likely) and the alternatives' ids.
    """

    token: str
    logprob: float | None
    top: tuple[tuple[str, float], ...] = ()
    token_id: int = -1
    rank: int = 0
    top_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class Delta:
    """What one engine step adds to a request: new text (possibly empty), tokens, and the end."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # on a request's first Delta, when asked


class DeltaChannel:
    """Carries one request's Deltas (or the exception that ended it) from an engine thread to the event loop.

    Create it on the event loop; `emit` is safe from any thread; `deltas()` ends after the finishing Delta.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()

    def emit(self, item: Delta | BaseException) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    @staticmethod
    def emit_all(items: list[tuple[DeltaChannel, Delta | BaseException]]) -> list[DeltaChannel]:
        """Hand many items over with one wake-up per event loop (a whole step's tokens at once).

        Returns the channels whose event loop is gone (closed while its process shuts down).
        """
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[DeltaChannel, Delta | BaseException]]] = {}
        for channel, item in items:
            by_loop.setdefault(channel._loop, []).append((channel, item))
        gone: list[DeltaChannel] = []
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:
                gone.extend(channel for channel, _ in batch)
        return gone

    async def deltas(self) -> AsyncIterator[Delta]:
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return


def _put_all(batch: list[tuple[DeltaChannel, Delta | BaseException]]) -> None:
    for channel, item in batch:
        channel._queue.put_nowait(item)


@dataclass(frozen=True, slots=True)
class EngineInfo:
    model: str
    kind: Literal["text", "vision"]
    max_model_len: int
    engine: str
    parallel: str
    devices: tuple[str, ...]
    vocab_size: int  # prompt token ids must lie in [0, vocab_size): past it they index out of the embedding
    tool_parser: str | None = None  # the family its tool calls are written in (shardbento.toolcalls)
    reasoning_parser: str | None = None  # how its reasoning is split from the answer (shardbento.reasoning)
    kv_pool_tokens: int | None = None  # the batch's KV pool; a request must fit it alone (None: no pool)


class Adapters(Protocol):
    """An engine's LoRA adapters by name: the catalog entry's, and those loaded at run time."""

    def names(self) -> list[str]: ...

    def source(self, name: str) -> str:
        """Where the adapter came from (its catalog source, or the path it was loaded from)."""

    async def load(self, name: str, path: str) -> None:
        """Register the PEFT adapter at `path` as `name` (a bad one is an InvalidRequest)."""

    async def unload(self, name: str) -> None:
        """New requests may no longer name it (ModelNotFound when unknown); running ones finish."""


class Engine(Protocol):
    """What the HTTP layer needs from any engine (transformers, tensor-parallel, vLLM); `info` names the
    model, its devices and its vocabulary size, so every engine refuses the same bad token ids."""

    info: EngineInfo
    adapters: Adapters | None  # None: the engine serves no LoRA adapters

    def render_chat(
        self, messages: list[ChatMessage], template_kwargs: dict[str, Any] | None = None
    ) -> Prompt:
        """The chat template's prompt; `template_kwargs` are the request's extra template variables."""

    def encode(self, text: str | list[int]) -> Prompt: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def check_constraint(self, constraint: Constraint) -> None:
        """Compile the constraint (cached); one this engine cannot use is an InvalidRequest."""

    def stream(self, prompt: Prompt, params: SamplingParams, request_id: str) -> AsyncIterator[Delta]: ...

    def stream_choices(
        self, prompt: Prompt, params: list[SamplingParams], request_id: str
    ) -> list[AsyncIterator[Delta]]:
        """One stream per choice of one prompt (named by choice_ids); a batching engine queues them
        together when the first starts, so the prompt is prefilled once for all of them."""

    def is_ready(self) -> bool: ...

    def is_alive(self) -> bool:
        """False once the engine can no longer serve (a worker process died): the service is restarted."""

    def close(self) -> None: ...


def choice_ids(request_id: str, n: int) -> list[str]:
    """The engine-side ids of a request's n choices (the request's own id when there is one)."""
    return [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]


def separate_choices(
    engine: Engine, prompt: Prompt, params: list[SamplingParams], request_id: str
) -> list[AsyncIterator[Delta]]:
    """stream_choices for an engine that runs each choice on its own (vLLM shares the prompt's KV by
    its own prefix caching)."""
    ids = choice_ids(request_id, len(params))
    return [engine.stream(prompt, p, rid) for p, rid in zip(params, ids, strict=True)]


class StartTogether(Generic[T]):
    """What the streams of one request's choices share: `start` builds and queues every choice's item,
    all at once, when the first of the streams starts; a refusal then reaches every stream."""

    def __init__(self, start: Callable[[], list[T]]) -> None:
        self._start: Callable[[], list[T]] | None = start
        self._items: list[T] = []
        self._error: BaseException | None = None

    def get(self, index: int) -> T:
        if self._start is not None:
            start, self._start = self._start, None
            try:
                self._items = start()
            except Exception as exc:
                self._error = exc
        if self._error is not None:
            raise self._error
        return self._items[index]
