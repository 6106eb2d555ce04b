"""The /v1/responses event stream: response.created and .in_progress, then each output item (reasoning,
message, function calls) as added, its content as deltas, done, and response.completed (or .incomplete)
with usage; every event numbered by sequence_number. A failure after the start ends the stream with
response.failed, as OpenAI's does."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from shardbento.api.errors import as_error
from shardbento.api.openai.responses_items import (
    function_call_item,
    item_id,
    message_item,
    output_text,
    reasoning_item,
    usage,
)
from shardbento.api.request import Generation
from shardbento.reasoning import Split

Event = dict[str, Any]


def sse_event(event: Event) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


class ResponseEvents:
    """One streamed response. Reasoning streams as reasoning_text deltas, the answer as output_text
    deltas; with tools, text that may start a call is held, and the parsed calls follow as items."""

    def __init__(self, base: Any, generation: Generation) -> None:
        self.base = base
        self.generation = generation
        self.splitter = generation.reasoning.splitter() if generation.reasoning is not None else None
        self.sequence = 0
        self.output: list[dict[str, Any]] = []  # finished items, in output order
        self.open: dict[str, Any] | None = None  # the item being streamed
        self.text = ""  # the answer so far (before tool calls are parsed out)
        self.sent = 0  # characters of `text` already sent as output_text deltas
        self.num_tokens = 0

    def _event(self, kind: str, **fields: Any) -> str:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse_event(event)

    def _response(self, **update: Any) -> dict[str, Any]:
        return self.base.model_copy(update=update).model_dump(mode="json")

    async def stream(self) -> AsyncIterator[str]:
        yield self._event("response.created", response=self._response())
        yield self._event("response.in_progress", response=self._response())
        finish = "length"
        try:
            async for delta in self.generation.deltas:
                self.num_tokens += len(delta.token_ids)
                finish = delta.finish_reason or finish
                for event in self._pieces(self._split(delta.text, delta.finish_reason is not None)):
                    yield event
            for event in self._finish(finish):
                yield event
        except Exception as exc:  # noqa: BLE001 - the stream has started: response.failed, not a cut
            error = as_error(exc, f"stream {self.generation.request_id}")
            code = "rate_limit_exceeded" if error.status == 429 else "server_error"
            failed = self._response(status="failed", error={"code": code, "message": error.message})
            yield self._event("response.failed", response=failed)
            return
        finally:
            await self.generation.deltas.aclose()
        incomplete = finish == "length" and not any(i["type"] == "function_call" for i in self.output)
        reasoning_tokens = self.splitter.reasoning_tokens if self.splitter is not None else 0
        final = self._response(
            status="incomplete" if incomplete else "completed",
            incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
            output=self.output,
            usage=usage(self.generation.prompt.num_tokens, self.num_tokens, reasoning_tokens),
        )
        yield self._event("response.incomplete" if incomplete else "response.completed", response=final)

    def _split(self, text: str, last: bool) -> Split:
        if self.splitter is None:
            return Split(content=text)
        split = self.splitter.push(text)
        if last:
            end = self.splitter.finish()
            split = Split(split.reasoning + end.reasoning, split.content + end.content)
        return split

    def _pieces(self, split: Split) -> list[str]:
        events: list[str] = []
        if self.splitter is not None and self.splitter.saw_block and not self._seen("reasoning"):
            events += self._start("reasoning")
        if split.reasoning:
            events.append(self._delta("response.reasoning_text.delta", split.reasoning))
        self.text += split.content
        use = self.generation.tool_use
        if use is None:
            end = len(self.text)
        elif use.tools.forced:
            end = 0
        else:
            end = use.parser.content_end(self.text, use.tools.tools)
        if end > self.sent:
            if not self._seen("message"):
                events += self._start("message")
            events.append(self._delta("response.output_text.delta", self.text[self.sent : end]))
            self.sent = end
        return events

    def _seen(self, kind: str) -> bool:
        return any(i["type"] == kind for i in self.output) or (self.open or {}).get("type") == kind

    def _start(self, kind: str) -> list[str]:
        """Close the item being streamed and open a `kind` item with one empty content part."""
        events = self._close("completed")
        item = reasoning_item(item_id("rs"), None, "in_progress")
        part = {"type": "reasoning_text", "text": ""}
        if kind == "message":
            item, part = message_item(item_id("msg"), None, "in_progress"), output_text("")
        self.open = {**item, "text": ""}
        index = len(self.output)
        events.append(self._event("response.output_item.added", output_index=index, item=item))
        events.append(
            self._event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=part,
            )
        )
        return events

    def _delta(self, kind: str, text: str) -> str:
        assert self.open is not None
        self.open["text"] += text
        extra = {"logprobs": []} if kind == "response.output_text.delta" else {}
        item = self.open["id"]
        return self._event(
            kind, item_id=item, output_index=len(self.output), content_index=0, delta=text, **extra
        )

    def _close(self, status: str) -> list[str]:
        """The open item's done events (text, content part, item); it joins the output."""
        if self.open is None:
            return []
        item, self.open = self.open, None
        text, index, rid = item["text"], len(self.output), item["id"]
        where = {"item_id": rid, "output_index": index, "content_index": 0}
        if item["type"] == "reasoning":
            done, part = reasoning_item(rid, text, "completed"), {"type": "reasoning_text", "text": text}
            events = [self._event("response.reasoning_text.done", **where, text=text)]
        else:
            done, part = message_item(rid, text, status), output_text(text)
            events = [self._event("response.output_text.done", **where, text=text, logprobs=[])]
        events.append(self._event("response.content_part.done", **where, part=part))
        events.append(self._event("response.output_item.done", output_index=index, item=done))
        self.output.append(done)
        return events

    def _finish(self, finish: str) -> list[str]:
        """The held text parsed: what is content closes the message, then each call is an item."""
        use = self.generation.tool_use
        calls = []
        if use is not None:
            content, calls = use.parser.parse(self.text, use.tools.tools)
            rest = (content if calls else self.text)[self.sent :]
        else:
            rest = self.text[self.sent :]
        events = []
        if rest or (not calls and not self._seen("message")):
            if not self._seen("message"):
                events += self._start("message")
            if rest:
                events.append(self._delta("response.output_text.delta", rest))
        events += self._close("incomplete" if finish == "length" and not calls else "completed")
        for call in calls:
            fid, index = item_id("fc"), len(self.output)
            added = function_call_item(fid, call, "in_progress", arguments="")
            events.append(self._event("response.output_item.added", output_index=index, item=added))
            where = {"item_id": fid, "output_index": index}
            events.append(
                self._event("response.function_call_arguments.delta", **where, delta=call.arguments)
            )
            events.append(
                self._event(
                    "response.function_call_arguments.done", **where, name=call.name, arguments=call.arguments
                )
            )
            done = function_call_item(fid, call, "completed")
            events.append(self._event("response.output_item.done", output_index=index, item=done))
            self.output.append(done)
        return events
