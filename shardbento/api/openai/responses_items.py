"""The Responses API's output items and usage as plain dicts (what responses.py and the event stream
both build; field names as in the openai SDK's `openai.types.responses`)."""

from __future__ import annotations

import secrets
from typing import Any

from shardbento.api.openai.responses_protocol import ResponseUsage
from shardbento.toolcalls import ParsedCall


def item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def usage(input_tokens: int, output_tokens: int, reasoning_tokens: int) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=input_tokens,
        input_tokens_details={"cached_tokens": 0},
        output_tokens=output_tokens,
        output_tokens_details={"reasoning_tokens": reasoning_tokens},
        total_tokens=input_tokens + output_tokens,
    )


def reasoning_item(rid: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [{"type": "reasoning_text", "text": text}]
    return {"type": "reasoning", "id": rid, "summary": [], "content": content, "status": status}


def message_item(mid: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [output_text(text)]
    return {"type": "message", "id": mid, "role": "assistant", "status": status, "content": content}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(
    fid: str, call: ParsedCall, status: str, arguments: str | None = None
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": fid,
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments if arguments is None else arguments,
        "status": status,
    }
