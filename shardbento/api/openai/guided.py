"""vLLM's `structured_outputs` and its older top-level `guided_*` fields, with OpenAI's response_format,
as the request's one Constraint; two ways of constraining the output are a 400 naming both fields."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from shardbento.api.openai.protocol import ResponseFormat, SamplingRequest, StructuredOutputs
from shardbento.api.openai.structured import response_constraint, schema_text
from shardbento.api.request import Tools
from shardbento.engine.base import Constraint
from shardbento.errors import InvalidRequest
from shardbento.toolcalls import closed

# The names vLLM took before structured_outputs (removed in vLLM 0.12; many clients still send them).
GUIDED_FIELDS = {
    "guided_choice": "choice",
    "guided_regex": "regex",
    "guided_grammar": "grammar",
    "guided_json": "json",
}
STRUCTURED_FIELDS = ("choice", "regex", "grammar", "json", "json_object")


def guided_fields(request: SamplingRequest) -> dict[str, Any]:
    return {name: getattr(request, name) for name in GUIDED_FIELDS}


def output_constraint(
    response_format: ResponseFormat | None,
    structured_outputs: StructuredOutputs | None,
    max_bytes: int,
    guided: Mapping[str, Any] | None = None,
) -> Constraint | None:
    """The one constraint a request asks for, or None. Unlike vLLM, which lets response_format
    override structured_outputs, asking twice is refused: the output cannot follow both."""
    asked = _asked(response_format, structured_outputs, guided or {})
    if len(asked) > 1:
        names = ", ".join(param for param, _, _ in asked)
        raise InvalidRequest(f"{names}: each constrains the output; send only one of them", param=asked[1][0])
    if not asked:
        return None
    param, kind, value = asked[0]
    if kind == "response_format":
        return response_constraint(value, max_bytes)
    if kind == "json_object":
        return Constraint("json_object", param=param)
    if kind == "json":
        # Objects that leave additionalProperties unsaid are closed, as response_format's schemas are.
        return Constraint("json_schema", schema_text(closed(_schema(value, param)), param, max_bytes), param)
    source = json.dumps(value, ensure_ascii=False) if kind == "choice" else value
    return Constraint(kind, _sized(source, param, max_bytes), param)


def refuse_beside_forced_call(constraint: Constraint | None, tools: Tools | None) -> None:
    """A tool_choice that forces a call is decoded under the call's own grammar: a structured_outputs
    or guided_* constraint beside it is a 400 (vLLM refuses it too). response_format keeps its older
    rule: the forced call wins."""
    if constraint is None or tools is None or not tools.forced:
        return
    if constraint.param.startswith("response_format"):
        return
    raise InvalidRequest(
        f"{constraint.param} and a tool_choice that forces a call both constrain the output; "
        "send only one of them",
        param=constraint.param,
    )


def _asked(
    response_format: ResponseFormat | None,
    structured_outputs: StructuredOutputs | None,
    guided: Mapping[str, Any],
) -> list[tuple[str, str, Any]]:
    """(field, kind, value) for every constraint the request sends."""
    asked: list[tuple[str, str, Any]] = []
    if response_format is not None and response_format.type != "text":
        asked.append(("response_format", "response_format", response_format))
    if structured_outputs is not None:
        given = structured_outputs.model_dump(by_alias=True, exclude_none=True)
        if not given:
            raise InvalidRequest(
                f"structured_outputs needs one of {', '.join(STRUCTURED_FIELDS)}", param="structured_outputs"
            )
        asked += [
            (f"structured_outputs.{kind}", kind, given[kind]) for kind in STRUCTURED_FIELDS if kind in given
        ]
    asked += [(name, GUIDED_FIELDS[name], value) for name, value in guided.items() if value is not None]
    return asked


def _schema(value: dict[str, Any] | str, param: str) -> dict[str, Any]:
    """A JSON schema sent as an object or as its JSON text (vLLM takes both)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"{param} is not JSON: {exc}", param=param) from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{param} must be a JSON schema object", param=param)
    return value


def _sized(text: str, param: str, max_bytes: int) -> str:
    """A grammar, regex or choice list under the same limit as a JSON schema."""
    size = len(text.encode())
    if size > max_bytes:
        raise InvalidRequest(
            f"{param} is {size} bytes; the limit is {max_bytes} (SHARDBENTO_MAX_SCHEMA_BYTES)", param=param
        )
    return text
