"""OpenAI's response_format and tools as the request object's constraint and Tools, checked by name."""

from __future__ import annotations

import json
from typing import Any

from shardbento.api.openai.protocol import (
    FunctionCallOut,
    JsonObjectFormat,
    JsonSchemaResponseFormat,
    NamedToolChoice,
    ResponseFormat,
    ToolCallIn,
    ToolCallOut,
    ToolDefinition,
)
from shardbento.api.request import Tools
from shardbento.engine.base import Constraint, ToolCall
from shardbento.errors import InvalidRequest
from shardbento.toolcalls import FunctionTool, ParsedCall, closed


def schema_text(schema: dict[str, Any], param: str, max_bytes: int) -> str:
    """A schema as compact JSON text (the grammar cache's key), refused past `max_bytes`."""
    text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    if len(text.encode()) > max_bytes:
        raise InvalidRequest(
            f"{param} is {len(text.encode())} bytes of JSON schema; the limit is {max_bytes} "
            "(SHARDBENTO_MAX_SCHEMA_BYTES)",
            param=param,
        )
    return text


def response_constraint(response_format: ResponseFormat | None, max_bytes: int) -> Constraint | None:
    """`text` (or none): unconstrained; `json_object`: any JSON object; `json_schema`: that schema."""
    if isinstance(response_format, JsonObjectFormat):
        return Constraint("json_object")
    if isinstance(response_format, JsonSchemaResponseFormat):
        # Objects that leave additionalProperties unsaid are closed, as for forced tool calls: the output
        # has the declared shape (`"additionalProperties": true` still allows more keys).
        param = "response_format.json_schema.schema"
        schema = closed(response_format.json_schema.json_schema)
        return Constraint("json_schema", schema_text(schema, param, max_bytes), param)
    return None


def request_tools(
    offered: list[ToolDefinition] | None,
    tool_choice: str | NamedToolChoice | None,
    parallel_tool_calls: bool | None,
    max_bytes: int,
) -> Tools | None:
    """The offered tools with tool_choice resolved ("auto" when tools are sent, as OpenAI's default)."""
    if not offered:
        if tool_choice not in (None, "none"):
            raise InvalidRequest(
                "tool_choice needs tools: send the tools it may choose from", param="tool_choice"
            )
        return None
    tools = []
    seen: set[str] = set()
    for i, tool in enumerate(offered):
        function = tool.function
        if function.name in seen:
            raise InvalidRequest(
                f"tools[{i}]: a second function named {function.name!r}", param=f"tools[{i}]"
            )
        seen.add(function.name)
        parameters = function.parameters or {"type": "object", "properties": {}}
        schema_text(parameters, f"tools[{i}].function.parameters", max_bytes)
        _check_object_schema(parameters, f"tools[{i}].function.parameters")
        tools.append(FunctionTool(function.name, function.description, parameters))
    choice = tool_choice or "auto"
    if isinstance(choice, NamedToolChoice):
        choice = choice.function.name
        if choice not in seen:
            raise InvalidRequest(
                f"tool_choice names function {choice!r}, which is not among tools ({', '.join(sorted(seen))})",
                param="tool_choice",
            )
    parallel = True if parallel_tool_calls is None else parallel_tool_calls
    return Tools(tuple(tools), choice, parallel)


def _check_object_schema(schema: dict[str, Any], param: str) -> None:
    """A tool's parameters as every call format reads them: `properties` an object of schemas (objects
    or booleans), `required` a list of names; what is wrong is a 400 naming the field."""
    properties = schema.get("properties", {})
    if not isinstance(properties, dict) or not all(isinstance(v, dict | bool) for v in properties.values()):
        raise InvalidRequest(
            f"{param}.properties must be an object of JSON schemas", param=f"{param}.properties"
        )
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
        raise InvalidRequest(f"{param}.required must be a list of property names", param=f"{param}.required")


def message_calls(
    index: int, role: str, content: Any, calls: list[ToolCallIn] | None
) -> tuple[ToolCall, ...]:
    """A history message's earlier tool calls, checked: only an assistant makes them, only beside them
    may its content be missing, and their arguments are JSON objects (templates read them as mappings)."""
    if calls and role != "assistant":
        raise InvalidRequest(
            f"messages[{index}]: only assistant messages carry tool_calls",
            param=f"messages[{index}].tool_calls",
        )
    if content is None and not calls:
        raise InvalidRequest(
            f"messages[{index}].content is missing; only an assistant message with tool_calls may omit it",
            param=f"messages[{index}].content",
        )
    result = []
    for j, call in enumerate(calls or []):
        try:
            arguments = json.loads(call.function.arguments)
        except json.JSONDecodeError as exc:
            arguments = exc
        if not isinstance(arguments, dict):
            raise InvalidRequest(
                f"messages[{index}].tool_calls[{j}].function.arguments must be a JSON object as text",
                param=f"messages[{index}].tool_calls[{j}].function.arguments",
            )
        result.append(ToolCall(call.id, call.function.name, call.function.arguments))
    return tuple(result)


def tool_calls_out(calls: list[ParsedCall]) -> list[ToolCallOut]:
    """Calls parsed from an answer in OpenAI's response shape (both the typed /chat and /v1 use it)."""
    return [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in calls]
