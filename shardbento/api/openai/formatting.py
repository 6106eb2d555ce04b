"""Encoding for /v1: pydantic errors as a 400 naming the field, engine logprobs and usage in OpenAI's
shapes, and SSE events (always json.dumps, never string formatting)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from shardbento.api.openai.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TopLogprob,
    Usage,
)
from shardbento.engine.base import TokenLogprob
from shardbento.errors import InvalidRequest

Request = TypeVar("Request", bound=BaseModel)
SCALAR_MEMBERS = ("str", "int", "float", "bool", "none")  # pydantic's names of a union's scalar members


def parse(model: type[Request], body: Any) -> Request:
    """The request model, or a 400 naming the first bad field (pydantic's message, our shape)."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = _located(body, exc.errors())
        problems = "; ".join(_problem(e) for e in errors[:5])
        raise InvalidRequest(f"invalid request: {problems}", param=_param(errors[0]["loc"])) from None


def parse_at(model: type[Request] | TypeAdapter[Any], body: Any, where: str) -> Any:
    """One part of a request (an input item, a tool) validated on its own; the 400 names it by `where`
    (`input[2].content[0].text`)."""
    try:
        if isinstance(model, TypeAdapter):
            return model.validate_python(body)
        return model.model_validate(body)
    except ValidationError as exc:
        errors = _located(body, exc.errors())
        problems = "; ".join(
            f"{_joined(where, e['loc'])}: {_problem(e).split(': ', 1)[1]}" for e in errors[:5]
        )
        raise InvalidRequest(f"invalid request: {problems}", param=_joined(where, errors[0]["loc"])) from None


def _located(body: Any, errors: list[Any]) -> list[Any]:
    """pydantic's errors with locations in the body's own terms, the most telling first: union members'
    names (`str`, `list[tagged-union[...]]`, a model's class name) and tagged unions' tags (a part's
    `type` value) are not fields of the body and go; where a `str | list` field got a list, the string
    member's complaint goes (`messages[0].content[1]: Input tag 'bogus'...`, not `content.str`)."""
    located = [{**e, "loc": _body_loc(body, e["loc"])} for e in errors]
    telling = [
        e
        for e, raw in zip(located, errors, strict=True)
        if not (raw["loc"][-1:] == ("str",) and isinstance(_at(body, e["loc"]), list))
    ]
    return telling or located


def _at(body: Any, loc: tuple[Any, ...]) -> Any:
    node = body
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _body_loc(body: Any, loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """A tagged union's tag stands in pydantic's location before the member's fields, the field of the
    same name after it (`0, "image_url", "image_url", "url"`): a part's `type` value is read as its tag
    once, where no field has that name or the same name follows."""
    node, out, tagged = body, [], False
    for i, part in enumerate(loc):
        following = loc[i + 1] if i + 1 < len(loc) else None
        fields = node if isinstance(node, dict) else {}
        if _member_name(part, fields, following):
            continue
        if not tagged and fields.get("type") == part and (part not in fields or following == part):
            tagged = True
            continue
        out.append(part)
        tagged = False
        node = _at(node, (part,))
    return tuple(out)


def _member_name(part: Any, fields: dict, following: Any) -> bool:
    """A union member's name in a location: not a field of the body where it stands, but `str`,
    `list[...]`, or a model's class name with the body's field after it."""
    if part in fields or not isinstance(part, str):
        return False
    return part in SCALAR_MEMBERS or "[" in part or (following is not None and following in fields)


def _joined(where: str, loc: tuple[Any, ...]) -> str:
    inner = _param(loc) or ""
    return where + inner if not inner or inner.startswith("[") else f"{where}.{inner}"


def _param(loc: tuple[Any, ...]) -> str | None:
    """`messages[0].content` from pydantic's ("messages", 0, "content")."""
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
    """The legacy logprobs object; an echoed prompt's first token has none (null, as OpenAI's)."""
    offsets = []
    for item in items:
        offsets.append(offset)
        offset += len(item.token)
    return CompletionLogprobs(
        tokens=[i.token for i in items],
        token_logprobs=[_finite(i.logprob) for i in items],
        top_logprobs=[  # logprobs=0: the chosen token alone
            None
            if i.logprob is None
            else {t: _finite(lp) for t, lp in i.top} or {i.token: _finite(i.logprob)}
            for i in items
        ],
        text_offset=offsets,
    )


def prompt_logprobs(items: list[TokenLogprob]) -> PromptLogprobs:
    """vLLM's prompt_logprobs: per prompt token, null for the first, else the token itself and the best
    alternatives by id, each with its logprob, rank and text."""
    out: PromptLogprobs = []
    for item in items:
        if item.logprob is None:
            out.append(None)
            continue
        entry = {
            str(i): PromptLogprob(logprob=_finite(lp), rank=rank, decoded_token=text)
            for rank, (i, (text, lp)) in enumerate(zip(item.top_ids, item.top, strict=True), 1)
        }
        entry.setdefault(
            str(item.token_id),
            PromptLogprob(logprob=_finite(item.logprob), rank=item.rank, decoded_token=item.token),
        )
        out.append(entry)
    return out


def _finite(logprob: float | None) -> float | None:
    """A token the model rules out has logprob -inf, which JSON cannot carry: -9999.0 (as vLLM sends)."""
    return None if logprob is None else max(logprob, -9999.0)


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )
