"""The /v1 serving class: OpenAI requests in, Serving calls, OpenAI responses or SSE chunks out."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from pydantic import BaseModel

from shardbento.api.adapters import load_adapter, unload_adapter
from shardbento.api.image_urls import ImageFetchConfig, load_image
from shardbento.api.openai.endpoints_protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    LoadLoraAdapterRequest,
    ModelList,
    ModelObject,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    UnloadLoraAdapterRequest,
)
from shardbento.api.openai.formatting import (
    chat_logprobs,
    completion_logprobs,
    parse,
    prompt_logprobs,
    usage,
)
from shardbento.api.openai.guided import guided_fields, output_constraint, refuse_beside_forced_call
from shardbento.api.openai.protocol import (
    NEUTRAL_VALUES,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionChoice,
    CompletionRequest,
    SamplingRequest,
    TextCompletion,
)
from shardbento.api.openai.streaming import (
    ChatChoiceStream,
    CompletionChoiceStream,
    EchoedPrompt,
    sse_stream,
    trimmed,
)
from shardbento.api.openai.structured import message_calls, request_tools, tool_calls_out
from shardbento.api.request import Completion, Generation, GenerationRequest, Sampling
from shardbento.api.serving import Serving, new_request_id
from shardbento.engine.base import ChatMessage
from shardbento.errors import InvalidRequest, ModelNotFound

logger = logging.getLogger(__name__)

Result = BaseModel | AsyncIterator[str]
OWNED_BY = "shardbento"


class OpenAIServing:
    """Maps OpenAI's fields onto Serving; Serving owns validation of messages, context and images."""

    def __init__(self, serving: Serving, images: ImageFetchConfig) -> None:
        self.serving = serving
        self.images = images

    def model(self, model_id: str) -> ModelObject:
        """`GET /v1/models/{id}` (the SDK's models.retrieve): the served model or adapter, else a 404."""
        self._check_model(model_id)
        return next(card for card in self.models().data if card.id == model_id)

    def _check_model(self, model_id: str) -> str | None:
        """The LoRA adapter a `model` names (None: the base model); any other name is a 404."""
        if model_id == self.serving.spec.name:
            return None
        if model_id in self.serving.adapter_names():
            return model_id
        served = ", ".join(repr(name) for name in [self.serving.spec.name, *self.serving.adapter_names()])
        raise ModelNotFound(
            f"The model {model_id!r} does not exist; this server serves {served}", param="model"
        )

    async def tokenize(self, body: Any) -> TokenizeResponse:
        """vLLM's POST /tokenize: chat messages (through the chat template) or a raw prompt."""
        chat = isinstance(body, dict) and "messages" in body
        request = parse(TokenizeChatRequest if chat else TokenizeCompletionRequest, body)
        if request.model is not None:
            self._check_model(request.model)
        if isinstance(request, TokenizeChatRequest):
            messages = tuple([await self._message(i, m) for i, m in enumerate(request.messages)])
            generation = GenerationRequest(
                new_request_id("tokenize"),
                Sampling(),
                messages=messages,
                chat_template_kwargs=request.chat_template_kwargs,
            )
        else:
            generation = GenerationRequest(new_request_id("tokenize"), Sampling(), prompt=request.prompt)
        prompt = await self.serving.tokenize(generation)
        tokens = list(prompt.token_ids)
        return TokenizeResponse(
            count=len(tokens), max_model_len=self.serving.spec.max_model_len, tokens=tokens
        )

    async def detokenize(self, body: Any) -> DetokenizeResponse:
        """vLLM's POST /detokenize: token ids in, their text out (ids outside the vocabulary: a 400)."""
        request = parse(DetokenizeRequest, body)
        if request.model is not None:
            self._check_model(request.model)
        return DetokenizeResponse(prompt=await self.serving.detokenize(tuple(request.tokens)))

    def models(self) -> ModelList:
        """The base model, then each LoRA adapter with `parent` set to it (vLLM's shape)."""
        spec = self.serving.spec
        common = {
            "created": int(time.time()),
            "owned_by": OWNED_BY,
            "max_model_len": spec.max_model_len,
            "kind": spec.kind,
            "ready": self.serving.is_ready(),
        }
        cards = [ModelObject(id=spec.name, root=spec.source, **common)]
        adapters = self.serving.adapters()
        for name in adapters.names() if adapters is not None else ():
            cards.append(ModelObject(id=name, root=adapters.source(name), parent=spec.name, **common))
        return ModelList(data=cards)

    async def load_lora_adapter(self, body: Any) -> str:
        """vLLM's POST /v1/load_lora_adapter (with SHARDBENTO_ALLOW_RUNTIME_LORA_UPDATING=1)."""
        allowed = self.serving.settings.allow_runtime_lora_updating
        return await load_adapter(self.serving.adapters(), allowed, parse(LoadLoraAdapterRequest, body))

    async def unload_lora_adapter(self, body: Any) -> str:
        allowed = self.serving.settings.allow_runtime_lora_updating
        return await unload_adapter(self.serving.adapters(), allowed, parse(UnloadLoraAdapterRequest, body))

    async def chat(self, body: Any) -> Result:
        request = parse(ChatCompletionRequest, body)
        adapter = self._check_common(request)
        if request.top_logprobs is not None and not request.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
        _refuse_streamed_prompt_logprobs(request)
        limits = self.serving.settings
        tools = request_tools(
            request.tools, request.tool_choice, request.parallel_tool_calls, limits.max_schema_bytes
        )
        messages = tuple([await self._message(i, m) for i, m in enumerate(request.messages)])
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        max_tokens = request.max_completion_tokens or request.max_tokens
        generation = GenerationRequest(
            request_id=new_request_id("chatcmpl"),
            sampling=self._sampling(request, max_tokens, logprobs, adapter),
            messages=messages,
            chat_template_kwargs=request.chat_template_kwargs,
            tools=tools,
            reasoning_effort=request.reasoning_effort,
        )
        refuse_beside_forced_call(generation.sampling.constraint, tools)
        if request.stream:
            started = await self.serving.stream_choices(generation, request.n)
            choices = [ChatChoiceStream(g, i) for i, g in enumerate(started)]
            return self._sse(generation.request_id, started, choices, request)
        completions = await self.serving.complete_choices(generation, request.n)
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(
                    content=c.text if c.text or not c.tool_calls else None,
                    reasoning_content=c.reasoning,
                    reasoning=c.reasoning,
                    tool_calls=tool_calls_out(c.tool_calls),
                ),
                logprobs=chat_logprobs(c.logprobs) if logprobs is not None else None,
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(completions)
        ]
        return ChatCompletion(
            id=generation.request_id,
            created=int(time.time()),
            model=request.model,
            choices=choices,
            usage=_usage(completions),
            prompt_logprobs=_prompt_logprobs(request, completions[0]),
        )

    async def completion(self, body: Any) -> Result:
        request = parse(CompletionRequest, body)
        adapter = self._check_common(request)
        prompt = _single_prompt(request.prompt)
        if request.reasoning_effort is not None:
            raise InvalidRequest(
                "reasoning_effort applies to chat completions (a raw prompt has no chat template)",
                param="reasoning_effort",
            )
        _refuse_streamed_prompt_logprobs(request)
        if request.max_tokens == 0 and not request.echo:
            raise InvalidRequest(
                "max_tokens must be at least 1 (0 is allowed with echo: the prompt alone comes back)",
                param="max_tokens",
            )
        # echo with logprobs returns the prompt's logprobs first (its first token's null), as OpenAI's
        # legacy API and vLLM do; max_tokens 0 with echo scores the prompt and generates nothing.
        scored = request.echo and request.logprobs is not None
        prompt_only = request.echo and request.max_tokens == 0
        sampling = self._sampling(
            request, 1 if prompt_only else request.max_tokens, request.logprobs, adapter
        )
        if scored:
            top = max(request.logprobs, request.prompt_logprobs or 0)
            sampling = dataclasses.replace(sampling, prompt_logprobs=top)
        generation = GenerationRequest(request_id=new_request_id("cmpl"), sampling=sampling, prompt=prompt)
        echo = ""
        if request.echo:
            echo = prompt if isinstance(prompt, str) else await self.serving.detokenize(prompt)
        echoed = EchoedPrompt(echo, request.logprobs if scored else None, prompt_only)
        with _named_echo(scored and request.prompt_logprobs is None):
            if request.stream:
                started = await self.serving.stream_choices(generation, request.n)
                choices = [CompletionChoiceStream(g, i, echoed) for i, g in enumerate(started)]
                return self._sse(generation.request_id, started, choices, request)
            completions = await self.serving.complete_choices(generation, request.n)
        if prompt_only:
            for c in completions:  # the one token generated to run the prompt is not returned
                c.text, c.logprobs, c.completion_tokens, c.finish_reason = "", [], 0, "length"
        choices = [
            CompletionChoice(
                index=i,
                text=echo + c.text,
                logprobs=(
                    completion_logprobs(echoed.logprobs(c.prompt_logprobs) + c.logprobs)
                    if request.logprobs is not None
                    else None
                ),
                finish_reason=c.finish_reason,
                prompt_logprobs=_prompt_logprobs(request, c),
            )
            for i, c in enumerate(completions)
        ]
        return TextCompletion(
            id=generation.request_id,
            created=int(time.time()),
            model=request.model,
            choices=choices,
            usage=_usage(completions),
        )

    def _sse(
        self, request_id: str, started: list[Generation], choices: list[Any], request: SamplingRequest
    ) -> Any:
        kind = ChatCompletionChunk if isinstance(request, ChatCompletionRequest) else TextCompletion
        base = kind(id=request_id, created=int(time.time()), model=request.model, choices=[])
        options = request.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = bool(options and options.continuous_usage_stats)
        frame = base.model_dump(mode="json", exclude={"usage"} if not include_usage else set())
        return sse_stream(started, choices, frame, include_usage, continuous)

    def _check_common(self, request: SamplingRequest) -> str | None:
        """The request's LoRA adapter (None: the base model) once its common fields are checked."""
        adapter = self._check_model(request.model)
        max_n = self.serving.settings.max_n
        if request.n > max_n:
            raise InvalidRequest(f"n is {request.n}; the limit is {max_n} (SHARDBENTO_MAX_N)", param="n")
        for name, neutral in NEUTRAL_VALUES.items():
            value = getattr(request, name, None)
            if not any(value == v and type(value) is type(v) for v in neutral):
                raise InvalidRequest(
                    f"{name} is not supported by this server; remove it from the request", param=name
                )
        if request.stream_options is not None and not request.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")
        return adapter

    async def _message(self, index: int, message: Any) -> ChatMessage:
        role = "system" if message.role == "developer" else message.role  # OpenAI's newer name for it
        calls = message_calls(index, role, message.content, getattr(message, "tool_calls", None))
        extra = {
            "tool_calls": calls,
            "tool_call_id": getattr(message, "tool_call_id", None),
            "name": message.name,
        }
        if message.content is None or isinstance(message.content, str):
            return ChatMessage(role=role, text=message.content or "", **extra)
        texts: list[str] = []
        images: list[Any] = []
        for j, part in enumerate(message.content):
            if part.type == "text":
                texts.append(part.text)
            else:
                param = f"messages[{index}].content[{j}].image_url"
                limits = self.serving.settings
                image = await load_image(
                    part.image_url.url,
                    self.images,
                    param=param,
                    max_bytes=limits.max_image_bytes,
                    max_pixels=limits.max_image_pixels,
                )
                images.append(image)
        return ChatMessage(role=role, text="\n".join(texts), images=tuple(images), **extra)

    def _sampling(
        self, request: SamplingRequest, max_tokens: int | None, logprobs: int | None, adapter: str | None
    ) -> Sampling:
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if "" in stop:
            raise InvalidRequest("stop strings must not be empty", param="stop")
        return Sampling(
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=0 if request.top_k == -1 else request.top_k,
            seed=request.seed,
            stop=tuple(stop),
            repetition_penalty=request.repetition_penalty,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            logit_bias=tuple(sorted((request.logit_bias or {}).items())),
            min_p=request.min_p,
            stop_token_ids=tuple(request.stop_token_ids or ()),
            min_tokens=request.min_tokens,
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=request.prompt_logprobs,
            constraint=output_constraint(
                request.response_format,
                request.structured_outputs,
                self.serving.settings.max_schema_bytes,
                guided_fields(request),
            ),
            adapter=adapter,
        )


@contextlib.contextmanager
def _named_echo(echo_asked: bool) -> Iterator[None]:
    """A refusal of prompt logprobs names `echo` when echo with logprobs asked for them (the request has
    no prompt_logprobs field for the client to look for)."""
    try:
        yield
    except InvalidRequest as exc:
        if not echo_asked or exc.param != "prompt_logprobs":
            raise
        raise InvalidRequest(
            f"echo with logprobs scores the prompt, and {exc.message}", param="echo", code=exc.code
        ) from exc


def _refuse_streamed_prompt_logprobs(request: SamplingRequest) -> None:
    if request.prompt_logprobs is not None and request.stream:  # as vLLM: they come with the whole answer
        raise InvalidRequest(
            "prompt_logprobs are not available when stream is true; with echo and logprobs a completion "
            "stream carries the prompt's logprobs in its first chunk",
            param="prompt_logprobs",
        )


def _prompt_logprobs(request: SamplingRequest, completion: Completion) -> Any:
    """vLLM's prompt_logprobs field, when the request asked for it."""
    if request.prompt_logprobs is None or completion.prompt_logprobs is None:
        return None
    return prompt_logprobs(trimmed(completion.prompt_logprobs, request.prompt_logprobs))


def _usage(completions: list[Completion]) -> Any:
    """The prompt counted once (as OpenAI does for n choices), every choice's tokens added up."""
    return usage(completions[0].prompt_tokens, sum(c.completion_tokens for c in completions))


def _single_prompt(prompt: str | list[int] | list[str] | list[list[int]]) -> str | tuple[int, ...]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise InvalidRequest(
                f"prompt holds {len(prompt)} prompts; this server completes one prompt per request",
                param="prompt",
            )
        prompt = prompt[0]
    if isinstance(prompt, str) and not prompt:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    return prompt if isinstance(prompt, str) else tuple(prompt)  # token ids are checked by Serving
