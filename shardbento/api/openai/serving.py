"""The /v1 serving class: OpenAI requests in, Serving calls, OpenAI responses or SSE chunks out."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import BaseModel

from shardbento.api.errors import as_error
from shardbento.api.image_urls import ImageFetchConfig, load_image
from shardbento.api.openai.formatting import chat_logprobs, completion_logprobs, parse, sse, usage
from shardbento.api.openai.protocol import (
    NEUTRAL_VALUES,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionChoice,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelList,
    ModelObject,
    SamplingRequest,
    TextCompletion,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from shardbento.api.request import Generation, GenerationRequest, Sampling
from shardbento.api.serving import Serving, new_request_id
from shardbento.engine.base import ChatMessage, TokenLogprob
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
        """`GET /v1/models/{id}` (the SDK's models.retrieve): the served model, else a 404."""
        self._check_model(model_id)
        return self.models().data[0]

    def _check_model(self, model_id: str) -> None:
        if model_id != self.serving.spec.name:
            raise ModelNotFound(
                f"The model {model_id!r} does not exist; this server serves {self.serving.spec.name!r}",
                param="model",
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
        spec = self.serving.spec
        card = ModelObject(
            id=spec.name,
            created=int(time.time()),
            owned_by=OWNED_BY,
            max_model_len=spec.max_model_len,
            kind=spec.kind,
            ready=self.serving.is_ready(),
        )
        return ModelList(data=[card])

    async def chat(self, body: Any) -> Result:
        request = parse(ChatCompletionRequest, body)
        self._check_common(request)
        if request.top_logprobs is not None and not request.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
        messages = tuple([await self._message(i, m) for i, m in enumerate(request.messages)])
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        max_tokens = request.max_completion_tokens or request.max_tokens
        generation = GenerationRequest(
            request_id=new_request_id("chatcmpl"),
            sampling=self._sampling(request, max_tokens, logprobs),
            messages=messages,
            chat_template_kwargs=request.chat_template_kwargs,
        )
        if request.stream:
            return self._chat_stream(await self.serving.stream(generation), request)
        completion = await self.serving.complete(generation)
        choice = ChatChoice(
            message=AssistantMessage(content=completion.text),
            logprobs=chat_logprobs(completion.logprobs) if logprobs is not None else None,
            finish_reason=completion.finish_reason,
        )
        return ChatCompletion(
            id=generation.request_id,
            created=int(time.time()),
            model=self.serving.spec.name,
            choices=[choice],
            usage=usage(completion.prompt_tokens, completion.completion_tokens),
        )

    async def completion(self, body: Any) -> Result:
        request = parse(CompletionRequest, body)
        self._check_common(request)
        generation = GenerationRequest(
            request_id=new_request_id("cmpl"),
            sampling=self._sampling(request, request.max_tokens, request.logprobs),
            prompt=_single_prompt(request.prompt),
        )
        if request.stream:
            return self._completion_stream(await self.serving.stream(generation), request)
        completion = await self.serving.complete(generation)
        choice = CompletionChoice(
            text=completion.text,
            logprobs=completion_logprobs(completion.logprobs) if request.logprobs is not None else None,
            finish_reason=completion.finish_reason,
        )
        return TextCompletion(
            id=generation.request_id,
            created=int(time.time()),
            model=self.serving.spec.name,
            choices=[choice],
            usage=usage(completion.prompt_tokens, completion.completion_tokens),
        )

    def _check_common(self, request: SamplingRequest) -> None:
        self._check_model(request.model)
        if request.n != 1:
            raise InvalidRequest(f"n is {request.n}; this server returns exactly one choice (n=1)", param="n")
        for name, neutral in NEUTRAL_VALUES.items():
            value = getattr(request, name, None)
            if not any(value == v and type(value) is type(v) for v in neutral):
                raise InvalidRequest(
                    f"{name} is not supported by this server; remove it from the request", param=name
                )
        if request.stream_options is not None and not request.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")

    async def _message(self, index: int, message: Any) -> ChatMessage:
        role = "system" if message.role == "developer" else message.role  # OpenAI's newer name for it
        if isinstance(message.content, str):
            return ChatMessage(role=role, text=message.content)
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
        return ChatMessage(role=role, text="\n".join(texts), images=tuple(images))

    def _sampling(self, request: SamplingRequest, max_tokens: int | None, logprobs: int | None) -> Sampling:
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
        )

    def _chat_stream(self, generation: Generation, request: ChatCompletionRequest) -> AsyncIterator[str]:
        base = ChatCompletionChunk(
            id=generation.request_id, created=int(time.time()), model=self.serving.spec.name, choices=[]
        )
        want_logprobs = generation.params.logprobs is not None
        first = True

        def chunk(text: str, items: list[TokenLogprob], finish: str | None) -> dict[str, Any]:
            nonlocal first
            delta = {"role": "assistant", "content": text} if first else {"content": text} if text else {}
            first = False
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            choice["logprobs"] = chat_logprobs(items).model_dump() if want_logprobs and items else None
            return choice

        return self._stream(generation, request, base, chunk)

    def _completion_stream(self, generation: Generation, request: CompletionRequest) -> AsyncIterator[str]:
        base = TextCompletion(
            id=generation.request_id, created=int(time.time()), model=self.serving.spec.name, choices=[]
        )
        want_logprobs = generation.params.logprobs is not None
        offset = 0

        def chunk(text: str, items: list[TokenLogprob], finish: str | None) -> dict[str, Any]:
            nonlocal offset
            logprobs = completion_logprobs(items, offset).model_dump() if want_logprobs and items else None
            offset += len(text)
            return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}

        return self._stream(generation, request, base, chunk)

    async def _stream(
        self,
        generation: Generation,
        request: SamplingRequest,
        base: ChatCompletionChunk | TextCompletion,
        choice: Callable[[str, list[TokenLogprob], str | None], dict[str, Any]],
    ) -> AsyncIterator[str]:
        """SSE framing shared by both endpoints: a chunk per text delta (the first carries the role and
        the first token; token-less deltas wait), the usage chunk, [DONE]; an error ends it with one event."""
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        frame = base.model_dump(mode="json", exclude={"usage"} if not include_usage else set())
        held: list[TokenLogprob] = []
        num_tokens = 0
        try:
            async for delta in generation.deltas:
                num_tokens += len(delta.token_ids)
                held.extend(delta.logprobs)
                if not delta.text and delta.finish_reason is None:
                    continue
                yield sse({**frame, "choices": [choice(delta.text, held, delta.finish_reason)]})
                held = []
        except Exception as exc:  # noqa: BLE001 - the stream has started: an error event, not a cut
            yield sse(as_error(exc, f"stream {generation.request_id}").body())
            return
        finally:
            await generation.deltas.aclose()
        if include_usage:
            used = usage(generation.prompt.num_tokens, num_tokens).model_dump()
            yield sse({**frame, "choices": [], "usage": used})
        yield "data: [DONE]\n\n"


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
