"""SSE for /v1: each choice's deltas as OpenAI chunks (reasoning as `reasoning_content` deltas, tool calls
as OpenAI's tool-call deltas), the n choices of one request interleaved as they come, then usage and
[DONE]."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from shardbento.api.errors import as_error
from shardbento.api.openai.formatting import chat_logprobs, completion_logprobs, sse, usage
from shardbento.api.request import Generation
from shardbento.engine.base import Delta, TokenLogprob
from shardbento.reasoning import Split

Choice = dict[str, Any]


class ChatChoiceStream:
    """One chat choice's chunks. A thinking model's reasoning goes out as `reasoning_content` (and
    `reasoning`) deltas, the answer after it as content. With tools, content streams up to where a call
    may start; the call text is held, parsed at the end and sent as tool-call deltas (id and name, then
    the arguments)."""

    def __init__(self, generation: Generation, index: int) -> None:
        self.index = index
        self.want_logprobs = generation.params.logprobs is not None
        self.tool_use = generation.tool_use
        self.first = True
        self.text = ""
        self.sent = 0  # characters of `text` already sent as content
        self.held: list[TokenLogprob] = []
        self.splitter = generation.reasoning.splitter() if generation.reasoning is not None else None

    def _choice(self, delta: dict[str, Any], finish: str | None = None) -> Choice:
        if self.first:
            delta = {"role": "assistant", **delta}
            self.first = False
        logprobs = chat_logprobs(self.held).model_dump() if self.want_logprobs and self.held else None
        self.held = []
        return {"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def tokens(self, delta: Delta) -> int:
        return len(delta.token_ids)

    def chunks(self, delta: Delta) -> list[Choice]:
        self.held.extend(delta.logprobs)
        if self.splitter is None:
            return self._answer(delta.text, delta.finish_reason)
        split = self.splitter.push(delta.text)
        if delta.finish_reason is not None:
            last = self.splitter.finish()
            split = Split(split.reasoning + last.reasoning, split.content + last.content)
        thought = split.reasoning
        out = [self._choice({"reasoning_content": thought, "reasoning": thought})] if thought else []
        return out + self._answer(split.content, delta.finish_reason)

    def _answer(self, text: str, finish: str | None) -> list[Choice]:
        if self.tool_use is None:
            if not text and finish is None:
                return []
            return [self._choice({"content": text} if text or self.first else {}, finish)]
        self.text += text
        if finish is None:
            use = self.tool_use
            end = 0 if use.tools.forced else use.parser.content_end(self.text, use.tools.tools)
            if end <= self.sent:
                return []
            piece, self.sent = self.text[self.sent : end], end
            return [self._choice({"content": piece})]
        return self._finish(finish)

    def _finish(self, finish: str) -> list[Choice]:
        use = self.tool_use
        content, calls = use.parser.parse(self.text, use.tools.tools)
        rest = (content if calls else self.text)[self.sent :]
        out = [self._choice({"content": rest})] if rest else []
        for k, call in enumerate(calls):
            head = {
                "index": k,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            out.append(self._choice({"tool_calls": [head]}))
            out.append(
                self._choice({"tool_calls": [{"index": k, "function": {"arguments": call.arguments}}]})
            )
        out.append(self._choice({}, "tool_calls" if calls else finish))
        return out


@dataclass(frozen=True, slots=True)
class EchoedPrompt:
    """What a completion returns before its output with echo: the prompt's text, its logprobs with `top`
    alternatives each (None: not asked), and whether the output is left out (`alone`: max_tokens 0)."""

    text: str = ""
    top: int | None = None
    alone: bool = False

    def logprobs(self, items: list[TokenLogprob] | None) -> list[TokenLogprob]:
        return [] if self.top is None or items is None else trimmed(items, self.top)


def trimmed(items: list[TokenLogprob], top: int) -> list[TokenLogprob]:
    """Prompt logprobs with at most `top` alternatives each."""
    return [replace(i, top=i.top[:top], top_ids=i.top_ids[:top]) for i in items]


class CompletionChoiceStream:
    """One completion choice's chunks, text offsets counted across them; the echoed prompt goes first
    (its logprobs in the first chunk when asked)."""

    def __init__(self, generation: Generation, index: int, echoed: EchoedPrompt = EchoedPrompt()) -> None:
        self.index = index
        self.want_logprobs = generation.params.logprobs is not None
        self.offset = 0  # the next token's text_offset
        self.echoed = echoed
        self.echo = echoed.text
        self.held: list[TokenLogprob] = []

    def tokens(self, delta: Delta) -> int:
        return 0 if self.echoed.alone else len(delta.token_ids)

    def chunks(self, delta: Delta) -> list[Choice]:
        self.held.extend(self.echoed.logprobs(delta.prompt_logprobs))
        finish = delta.finish_reason
        if self.echoed.alone:  # the token generated to run the prompt is not returned
            delta, finish = Delta(text="", finish_reason=finish), "length" if finish else None
        self.held.extend(delta.logprobs)
        text, self.echo = self.echo + delta.text, ""
        if not text and finish is None:
            return []
        items, self.held = self.held, []
        logprobs = (
            completion_logprobs(items, self.offset).model_dump() if self.want_logprobs and items else None
        )
        self.offset += sum(len(item.token) for item in items)  # as a whole answer's offsets count
        return [{"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish}]


async def interleaved(generations: list[Generation]) -> AsyncIterator[tuple[int, Delta]]:
    """Every generation's deltas tagged with its index, in the order they arrive; the first failure
    ends the whole stream (the others are closed)."""
    if len(generations) == 1:
        async for delta in generations[0].deltas:
            yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, Delta | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for delta in generation.deltas:
                await queue.put((index, delta))
            await queue.put((index, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def sse_stream(
    generations: list[Generation],
    choices: list[Any],
    frame: dict[str, Any],
    include_usage: bool,
    continuous_usage: bool = False,
) -> AsyncIterator[str]:
    """The SSE body: chunks per choice as they come (with the usage so far when `continuous_usage`),
    an error event if one fails, usage, [DONE]."""
    num_tokens = 0
    prompt_tokens = generations[0].prompt.num_tokens
    try:
        async for index, delta in interleaved(generations):
            num_tokens += choices[index].tokens(delta)
            for choice in choices[index].chunks(delta):
                chunk = {**frame, "choices": [choice]}
                if continuous_usage:
                    chunk["usage"] = usage(prompt_tokens, num_tokens).model_dump()
                yield sse(chunk)
    except Exception as exc:  # noqa: BLE001 - the stream has started: an error event, not a cut
        yield sse(as_error(exc, f"stream {generations[0].request_id}").body())
        return
    finally:
        for generation in generations:
            await generation.deltas.aclose()
    if include_usage:
        used = usage(prompt_tokens, num_tokens).model_dump()
        yield sse({**frame, "choices": [], "usage": used})
    yield "data: [DONE]\n\n"
