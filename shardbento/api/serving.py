"""The request path every API shares: validate, render the prompt, check the context, run the engine."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio

from shardbento.api.adapters import check_adapter
from shardbento.api.middleware.faults import raise_requested_fault
from shardbento.api.request import SEED_MAX, Completion, Generation, GenerationRequest, Sampling, ToolUse
from shardbento.api.thinking import (
    check_reasoning_effort,
    constrain_answer,
    prompt_reasoning,
    read_completion,
    tag_ids,
)
from shardbento.catalog import ModelSpec
from shardbento.engine.base import (
    Adapters,
    ChatMessage,
    Constraint,
    Delta,
    Engine,
    Prompt,
    SamplingParams,
)
from shardbento.errors import GenerationFailed, InvalidRequest, NotReady, RequestTimeout, ShardbentoError
from shardbento.logs import REQUEST_ID
from shardbento.settings import Settings
from shardbento.toolcalls import PARSERS

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")


def new_request_id(prefix: str = "req") -> str:
    """Reuses the HTTP request's id (shardbento.logs) so engine log lines and responses match it."""
    http_id = REQUEST_ID.get()
    return f"{prefix}-{http_id.split('-', 1)[1]}" if http_id else f"{prefix}-{uuid.uuid4().hex[:24]}"


class Serving:
    """Owns the engine handle; the typed APIs and /v1 are thin layers over this class."""

    def __init__(self, spec: ModelSpec, settings: Settings | None = None) -> None:
        self.spec = spec
        self.settings = settings or Settings.from_env()
        self.engine: Engine | None = None
        self.load_error: str | None = None

    def attach(self, engine: Engine) -> None:
        self.engine = engine

    def is_ready(self) -> bool:
        return self.engine is not None and self.engine.is_ready()

    def is_alive(self) -> bool:
        """False once the model failed to load or its engine died: /livez answers 503, so a supervisor
        (Kubernetes, BentoCloud) restarts the service."""
        return self.load_error is None and (self.engine is None or self.engine.is_alive())

    def ready_engine(self) -> Engine:
        if self.load_error is not None:
            raise NotReady(f"model {self.spec.name!r} failed to load: {self.load_error}")
        if self.engine is None:
            raise NotReady(f"model {self.spec.name!r} is still loading; retry shortly")
        if not self.engine.is_ready():
            raise NotReady(f"model {self.spec.name!r} is not serving (an engine process stopped)")
        return self.engine

    def adapters(self) -> Adapters | None:
        """The engine's LoRA adapters (None while it loads, or for an engine with none)."""
        return getattr(self.engine, "adapters", None)

    def adapter_names(self) -> list[str]:
        """What a request may name besides the base model: the catalog's adapters and loaded ones."""
        adapters = self.adapters()
        return adapters.names() if adapters is not None else list(self.spec.lora_adapters)

    def check_messages(self, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        if not messages:
            raise InvalidRequest("messages must contain at least one message", param="messages")
        if len(messages) > self.settings.max_messages:
            raise InvalidRequest(
                f"request has {len(messages)} messages; the limit is {self.settings.max_messages} "
                "(SHARDBENTO_MAX_MESSAGES)",
                param="messages",
            )
        call_ids: set[str] = set()
        for i, message in enumerate(messages):
            if message.role not in ROLES:
                raise InvalidRequest(
                    f"messages[{i}].role is {message.role!r}; allowed: {', '.join(ROLES)}",
                    param=f"messages[{i}].role",
                )
            call_ids.update(call.id for call in message.tool_calls)
            if message.role == "tool" and message.tool_call_id not in call_ids:
                raise InvalidRequest(
                    f"messages[{i}] is a tool result for call {message.tool_call_id!r}, which no earlier "
                    "assistant message made (its tool_calls ids: "
                    f"{', '.join(sorted(call_ids)) or 'none'})",
                    param=f"messages[{i}].tool_call_id",
                )
        num_images = sum(len(m.images) for m in messages)
        if num_images and self.spec.kind != "vision":
            raise InvalidRequest(
                f"model {self.spec.name!r} is a text model and accepts no images; "
                "send text only or serve a vision model",
                param="image",
            )
        if num_images > self.max_images:
            raise InvalidRequest(
                f"request has {num_images} images; model {self.spec.name!r} accepts at most "
                f"{self.max_images} per request",
                param="image",
            )
        return list(messages)

    @property
    def max_images(self) -> int:
        limit = self.settings.max_images
        return self.spec.max_images if limit is None else min(limit, self.spec.max_images)

    @property
    def max_prompt_tokens(self) -> int:
        limit = self.settings.max_prompt_tokens
        return self.spec.max_model_len if limit is None else min(limit, self.spec.max_model_len)

    def check_stop(self, stop: Sequence[str]) -> None:
        limits = self.settings
        if len(stop) > limits.max_stop_strings:
            raise InvalidRequest(
                f"request has {len(stop)} stop strings; the limit is {limits.max_stop_strings}", param="stop"
            )
        longest = max((len(s) for s in stop), default=0)
        if longest > limits.max_stop_length:
            raise InvalidRequest(
                f"a stop string is {longest} characters long; the limit is {limits.max_stop_length}",
                param="stop",
            )

    async def _prompt(self, engine: Engine, request: GenerationRequest) -> Prompt:
        """The request's prompt as token ids: chat messages through the template, or the raw prompt.
        Rendering and tokenizing run in a worker thread (templates and image processors are slow)."""
        if request.messages is not None:
            checked = self.check_messages(request.messages)
            template_kwargs = _template_kwargs(request.chat_template_kwargs)
            if request.reasoning_effort is not None:
                template_kwargs = {**(template_kwargs or {}), "reasoning_effort": request.reasoning_effort}
            if request.tools is not None:
                template_kwargs = {
                    **(template_kwargs or {}),
                    "tools": [t.template_dict() for t in request.tools.tools],
                }
            return await anyio.to_thread.run_sync(engine.render_chat, checked, template_kwargs)
        if isinstance(request.prompt, tuple):
            self._check_token_ids(engine, request.prompt)
            return await anyio.to_thread.run_sync(engine.encode, list(request.prompt))
        return await anyio.to_thread.run_sync(engine.encode, request.prompt)

    def _check_token_ids(self, engine: Engine, ids: tuple[int, ...], param: str = "prompt") -> None:
        vocab_size = engine.info.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if not ids or bad:
            raise InvalidRequest(
                f"{param} token ids must be a non-empty list of ids in [0, {vocab_size}); got {bad[:5]}",
                param=param,
            )

    def params(
        self, prompt: Prompt, sampling: Sampling, vocab_size: int, kv_pool_tokens: int | None = None
    ) -> SamplingParams:
        """Merge the request's fields with the spec's defaults; check the context, the KV pool (a request
        must fit it alone) and the token ids."""
        for name, ids in (
            ("logit_bias", [i for i, _ in sampling.logit_bias]),
            ("stop_token_ids", sampling.stop_token_ids),
        ):
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise InvalidRequest(
                    f"{name} names token ids outside [0, {vocab_size}): {bad[:5]}", param=name
                )
        defaults = self.spec.generation
        limit = self.spec.max_model_len
        if prompt.num_tokens > self.max_prompt_tokens:
            if self.max_prompt_tokens == limit:  # OpenAI's wording: clients classify overflows by it
                raise self._overflow(prompt.num_tokens, sampling.max_tokens or 0)
            raise InvalidRequest(
                f"This server's maximum prompt length is {self.max_prompt_tokens} tokens "
                f"(SHARDBENTO_MAX_PROMPT_TOKENS). However, your messages resulted in {prompt.num_tokens} "
                "tokens. Please reduce the length of the messages.",
                param="messages",
                code="context_length_exceeded",
            )
        self.check_stop(sampling.stop)
        if sampling.prompt_logprobs is not None and prompt.num_images:
            raise InvalidRequest(
                "prompt logprobs are computed for text prompts only; this request has images",
                param="prompt_logprobs",
            )
        room = limit - prompt.num_tokens
        max_tokens = sampling.max_tokens
        if max_tokens is None:
            if room < 1:
                raise self._overflow(prompt.num_tokens, 1)
            max_tokens = min(defaults.max_tokens, room)
            if kv_pool_tokens is not None:
                max_tokens = max(min(max_tokens, kv_pool_tokens - prompt.num_tokens), 1)
        elif prompt.num_tokens + max_tokens > limit:
            raise self._overflow(prompt.num_tokens, max_tokens)
        if kv_pool_tokens is not None and prompt.num_tokens + max_tokens > kv_pool_tokens:
            raise InvalidRequest(
                f"This request needs {prompt.num_tokens + max_tokens} tokens of KV cache "
                f"({prompt.num_tokens} in the messages, {max_tokens} in the completion); the server's KV "
                f"pool holds {kv_pool_tokens} tokens in all (limits.kv_cache_tokens, kv_cache_gib or "
                "gpu_memory_utilization). Please reduce the length of the messages or completion.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        values = {
            f.name: getattr(sampling, f.name)
            for f in dataclasses.fields(sampling)
            if f.name != "max_tokens" and getattr(sampling, f.name) is not None
        }
        values.setdefault("temperature", defaults.temperature)
        values.setdefault("top_p", defaults.top_p)
        values.setdefault("top_k", defaults.top_k)
        values.setdefault("repetition_penalty", defaults.repetition_penalty)
        values["stop"] = tuple(dict.fromkeys([*self.spec.stop, *values.get("stop", ())]))
        if values.get("min_tokens", 0) > max_tokens:
            raise InvalidRequest(
                f"min_tokens ({values['min_tokens']}) must not exceed max_tokens ({max_tokens})",
                param="min_tokens",
            )
        return SamplingParams(max_tokens=max_tokens, **values)

    def _overflow(self, prompt_tokens: int, completion_tokens: int) -> InvalidRequest:
        limit = self.spec.max_model_len
        return InvalidRequest(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + completion_tokens} tokens ({prompt_tokens} in the messages, "
            f"{completion_tokens} in the completion). Please reduce the length of the messages or completion.",
            param="messages",
            code="context_length_exceeded",
        )

    async def tokenize(self, request: GenerationRequest) -> Prompt:
        """The request's prompt as the engine would see it, validated the same way; nothing runs."""
        return await self._prompt(self.ready_engine(), request)

    async def detokenize(self, token_ids: tuple[int, ...]) -> str:
        engine = self.ready_engine()
        self._check_token_ids(engine, token_ids, param="tokens")
        return await anyio.to_thread.run_sync(engine.decode, list(token_ids))

    async def stream(self, request: GenerationRequest) -> Generation:
        return (await self.stream_choices(request, 1))[0]

    async def stream_choices(self, request: GenerationRequest, n: int) -> list[Generation]:
        """Validate and render the request once, check it against the context, start its n choices
        (the engine prefills the prompt once for them) and return once each has its first delta (see
        Generation); every failure is a typed error, and one choice's failure stops them all."""
        engine = self.ready_engine()
        check_adapter(request.sampling.adapter, self.adapter_names())
        check_reasoning_effort(engine, request, self.spec.name)
        tool_use = self._tool_use(engine, request)
        prompt = await self._prompt(engine, request)
        reasoning = await prompt_reasoning(engine, request, prompt.token_ids)
        params = self.params(prompt, request.sampling, engine.info.vocab_size, engine.info.kv_pool_tokens)
        if tool_use is not None and tool_use.tools.forced:  # the call is made by grammar, so it parses
            parser = tool_use.parser
            tags = await anyio.to_thread.run_sync(tag_ids, engine, parser.tags)
            grammar = parser.grammar(tool_use.tools.forced, tool_use.tools.parallel, tags)
            params = dataclasses.replace(params, constraint=Constraint("lark", grammar, param="tool_choice"))
        params = constrain_answer(params, reasoning)  # a thinking model reasons first, unconstrained
        if params.constraint is not None:
            await anyio.to_thread.run_sync(engine.check_constraint, params.constraint)
        choices = [dataclasses.replace(params, seed=_nth_seed(params.seed, i)) for i in range(n)]
        streams = engine.stream_choices(prompt, choices, request.request_id)
        deltas = [self._deltas(stream, request.request_id) for stream in streams]
        firsts = await asyncio.gather(*(anext(d) for d in deltas), return_exceptions=True)
        failed = [first for first in firsts if isinstance(first, BaseException)]
        if failed:
            for d in deltas:
                await d.aclose()
            if isinstance(failed[0], StopAsyncIteration):
                raise GenerationFailed("the engine ended the request without any output")
            raise failed[0]
        return [
            Generation(request.request_id, prompt, p, _chained(first, d), tool_use, reasoning)
            for p, first, d in zip(choices, firsts, deltas, strict=True)
        ]

    def _tool_use(self, engine: Engine, request: GenerationRequest) -> ToolUse | None:
        """The parser for a request that offers tools (None when it offers none or says "none")."""
        if request.tools is None or request.tools.choice == "none":
            return None
        family = engine.info.tool_parser
        if family is None:
            raise InvalidRequest(
                f"model {self.spec.name!r} has no known tool-call format (its chat template names none); "
                "set tool_parser in its catalog entry or send tool_choice: none",
                param="tools",
            )
        return ToolUse(PARSERS[family](), request.tools)

    async def complete(self, request: GenerationRequest) -> Completion:
        return (await self.complete_choices(request, 1))[0]

    async def complete_choices(self, request: GenerationRequest, n: int) -> list[Completion]:
        return list(await asyncio.gather(*map(read_completion, await self.stream_choices(request, n))))

    async def _deltas(self, deltas: AsyncIterator[Delta], request_id: str) -> AsyncIterator[Delta]:
        """The engine's deltas under the request deadline; an engine failure becomes one typed error for
        this request only."""
        deadline_s = asyncio.get_running_loop().time() + self.settings.request_timeout_s
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline_s):
                        delta = await anext(deltas)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise RequestTimeout(
                        f"the request took longer than {self.settings.request_timeout_s:g} s "
                        "(SHARDBENTO_REQUEST_TIMEOUT_S); ask for fewer max_tokens"
                    ) from None
                raise_requested_fault()
                yield delta
        except ShardbentoError:
            raise
        except Exception as exc:
            logger.warning("request %s failed: %s", request_id, type(exc).__name__)
            raise GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}") from exc
        finally:
            aclose = getattr(deltas, "aclose", None)
            if aclose is not None:
                await aclose()


def _nth_seed(seed: int | None, index: int) -> int | None:
    """Choice i's seed: one more per choice, so seeded sampled choices differ and still reproduce."""
    if seed is None or index == 0:
        return seed
    return seed + index if seed + index <= SEED_MAX else seed - index


# Variables the chat template call sets itself: a request may not replace them through its kwargs.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "messages",
        "conversation",
        "chat_template",
        "add_generation_prompt",
        "tokenize",
        "return_dict",
        "continue_final_message",
        "tools",
        "documents",
        "tokenizer",
        "processor",
    }
)


def _template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    reserved = sorted(set(kwargs or ()) & RESERVED_TEMPLATE_KWARGS)
    if reserved:
        raise InvalidRequest(
            f"chat_template_kwargs may not set {', '.join(reserved)}: the server sets them",
            param="chat_template_kwargs",
        )
    return kwargs


async def _chained(first: Delta, rest: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    try:
        yield first
        async for delta in rest:
            yield delta
    finally:
        await rest.aclose()
