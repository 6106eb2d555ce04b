"""Encoding for /v1: pydantic errors as a 400 naming the field, engine logprobs and usage in OpenAI's
shapes, and SSE events (always json.dumps, never string formatting)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from shardbento.api.openai.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    TopLogprob,
    Usage,
)
from shardbento.engine.base import TokenLogprob
from shardbento.errors import InvalidRequest

Request = TypeVar("Request", bound=BaseModel)


def parse(model: type[Request], body: Any) -> Request:
    """The request model, or a 400 naming the first bad field (pydantic's message, our shape)."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        param = _param(exc.errors()[0]["loc"])
        problems = "; ".join(_problem(e) for e in exc.errors()[:5])
        raise InvalidRequest(f"invalid request: {problems}", param=param) from None


def _param(loc: tuple[Any, ...]) -> str | None:
    """`messages[0].content` from pydantic's ("messages", 0, "content"), without union member tags."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier():
            path += f".{part}" if path else part
        else:
            break
    return path or None


def _problem(error: Any) -> str:
    where = _param(error["loc"]) or "body"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown field; this server does not accept it"
    return f"{where}: {error['msg']}"


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def chat_logprobs(items: list[TokenLogprob]) -> ChatLogprobs:
    def top(token: str, logprob: float) -> TopLogprob:
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))

    content = [
        ChatTokenLogprob(**top(i.token, i.logprob).model_dump(), top_logprobs=[top(t, lp) for t, lp in i.top])
        for i in items
    ]
    return ChatLogprobs(content=content)


def completion_logprobs(items: list[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
    offsets = []
    for item in items:
        offsets.append(offset)
        offset += len(item.token)
    return CompletionLogprobs(
        tokens=[i.token for i in items],
        token_logprobs=[i.logprob for i in items],
        top_logprobs=[dict(i.top) or {i.token: i.logprob} for i in items],  # logprobs=0: the chosen token
        text_offset=offsets,
    )


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )
