"""Tool calls in each model family's own text format: parsed out of the output, forced by a grammar.

A parser knows where its family's call text starts (so a stream sends plain content up to there and
holds the rest), how to turn the finished output into calls, and the Lark grammar (llguidance's
dialect, JSON schemas inline) that makes the model write a call when `tool_choice` demands one.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, ClassVar

from shardbento.textmatch import held_suffix


@dataclass(frozen=True, slots=True)
class FunctionTool:
    name: str
    description: str | None = None
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def template_dict(self) -> dict[str, Any]:
        """OpenAI's tool object, which is what chat templates read."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description is not None:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object as text
    id: str = field(default_factory=lambda: f"call_{secrets.token_hex(12)}")


def _literal(text: str) -> str:
    return json.dumps(text)  # a Lark string literal: JSON's escapes are Lark's


# Compact JSON inside call grammars too (as engine/grammar.py compiles response formats): with free
# whitespace a model may pad a call with spaces and tabs until max_tokens.
COMPACT = {"whitespace_flexible": False}


def _schema(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps({**closed(schema), "x-guidance": COMPACT})


def closed(schema: Any) -> Any:
    """The schema with `additionalProperties: false` wherever an object leaves it unsaid: a forced call
    carries exactly the arguments the function declares (vLLM's disable_additional_properties)."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: closed(value) if key != "properties" else value for key, value in schema.items()}
    if isinstance(schema.get("properties"), dict):
        result["properties"] = {name: closed(sub) for name, sub in schema["properties"].items()}
    if (schema.get("type") == "object" or "properties" in schema) and "additionalProperties" not in schema:
        result["additionalProperties"] = False
    return result


def _arguments(value: Any) -> str | None:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


class ToolParser:
    """The Hermes format (Qwen2.5, Hermes 2/3 and most ChatML tool templates)."""

    name: ClassVar[str] = "hermes"
    start: ClassVar[str] = "<tool_call>"
    end: ClassVar[str] = "</tool_call>"
    arguments_key: ClassVar[str] = "arguments"
    open_ended: ClassVar[bool] = True  # a call whose end tag never came still counts when it parses

    @property
    def tags(self) -> tuple[str, ...]:
        """The markup the grammar writes, which a tokenizer may hold as single tokens."""
        return (self.start, self.end)

    def content_end(self, text: str, tools: tuple[FunctionTool, ...]) -> int:
        """How much of the output so far is surely content: up to a call's start, less any tail that
        may be the beginning of one."""
        at = text.find(self.start)
        return at if at >= 0 else len(text) - held_suffix(text, [self.start])

    def parse(self, text: str, tools: tuple[FunctionTool, ...]) -> tuple[str, list[ParsedCall]]:
        """(content, calls) from the whole output; text that does not parse as a call stays content."""
        pattern = re.compile(re.escape(self.start) + r"\s*(.*?)\s*(" + re.escape(self.end) + r"|$)", re.S)
        calls = []
        for match in pattern.finditer(text):
            call = self._call(match.group(1), tools) if match.group(2) or self.open_ended else None
            if call is None and not match.group(2) and calls:
                break  # a last call cut off by max_tokens: the complete ones before it stand
            if call is None:
                return text, []
            calls.append(call)
        at = text.find(self.start)
        return (text if at < 0 else text[:at].rstrip()), calls

    def _call(self, body: str, tools: tuple[FunctionTool, ...]) -> ParsedCall | None:
        try:
            data = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(data, dict) or data.get("name") not in {t.name for t in tools}:
            return None
        arguments = _arguments(data.get(self.arguments_key, {}))
        return ParsedCall(data["name"], arguments) if arguments is not None else None

    def _call_schema(self, tools: tuple[FunctionTool, ...]) -> dict[str, Any]:
        variants = [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, self.arguments_key: t.parameters},
                "required": ["name", self.arguments_key],
                "additionalProperties": False,
            }
            for t in tools
        ]
        return variants[0] if len(variants) == 1 else {"anyOf": variants}

    def grammar(
        self, tools: tuple[FunctionTool, ...], parallel: bool, tag_ids: dict[str, int] | None = None
    ) -> str:
        """A Lark grammar whose every sentence is one call (or several, with `parallel`) to `tools`.
        `tag_ids`: the ids of the `tags` that are one token each (Qwen's `<tool_call>`): llguidance
        keeps added tokens of the form <...> out of text, so the grammar names the tokens."""
        start, end = (_tag(tag, tag_ids) for tag in (self.start, self.end))
        call = f'{start} "\\n" {_schema(self._call_schema(tools))} "\\n" {end}'
        repeat = f" ({_literal(chr(10))} call)*" if parallel else ""
        return f"start: call{repeat}\ncall: {call}\n"


class Llama3JsonParser(ToolParser):
    """Llama 3.1/3.2's JSON calls: `{"name": ..., "parameters": {...}}`, after `<|python_tag|>` or alone,
    several joined by `; `; an output that starts otherwise is content."""

    name = "llama3_json"
    start = "<|python_tag|>"
    arguments_key = "parameters"

    def content_end(self, text: str, tools: tuple[FunctionTool, ...]) -> int:
        head = text.lstrip()
        if not head or head.startswith(("{", self.start)) or self.start.startswith(head):
            return 0
        return len(text)

    def parse(self, text: str, tools: tuple[FunctionTool, ...]) -> tuple[str, list[ParsedCall]]:
        body = text.strip().removeprefix(self.start).strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        decoder = json.JSONDecoder()
        at = 0
        while at < len(body):
            try:
                _, end = decoder.raw_decode(body, at)
            except json.JSONDecodeError:
                return text, []
            call = self._call(body[at:end], tools)
            if call is None:
                return text, []
            calls.append(call)
            at = end
            while at < len(body) and body[at] in " ;\n":
                at += 1
        return "", calls

    def grammar(
        self, tools: tuple[FunctionTool, ...], parallel: bool, tag_ids: dict[str, int] | None = None
    ) -> str:
        repeat = f" ({_literal('; ')} call)*" if parallel else ""
        return f"start: call{repeat}\ncall: {_schema(self._call_schema(tools))}\n"


class Glm4Parser(ToolParser):
    """GLM-4's calls: the function's name on the first line of the turn, its arguments' JSON after it."""

    name = "glm4"

    def content_end(self, text: str, tools: tuple[FunctionTool, ...]) -> int:
        names = {t.name for t in tools}
        head = text.lstrip()
        first, newline, _ = head.partition("\n")
        if not newline:
            return 0 if any(n.startswith(first) for n in names) else len(text)
        return 0 if first.strip() in names else len(text)

    def parse(self, text: str, tools: tuple[FunctionTool, ...]) -> tuple[str, list[ParsedCall]]:
        first, _, rest = text.strip().partition("\n")
        if first.strip() not in {t.name for t in tools}:
            return text, []
        try:
            arguments = _arguments(json.loads(rest))
        except json.JSONDecodeError:
            return text, []
        return ("", [ParsedCall(first.strip(), arguments)]) if arguments is not None else (text, [])

    def grammar(
        self, tools: tuple[FunctionTool, ...], parallel: bool, tag_ids: dict[str, int] | None = None
    ) -> str:
        # GLM-4 makes one call per turn (its template answers each with an observation turn).
        options = " | ".join(f"{_literal(t.name + chr(10))} {_schema(t.parameters)}" for t in tools)
        return f"start: {options}\n"


class Glm45Parser(ToolParser):
    """GLM-4.5's calls: `<tool_call>` and the name, then one `<arg_key>`/`<arg_value>` pair per argument,
    then `</tool_call>`; string values are written raw, other values as JSON (as its template writes
    earlier calls); several calls follow one another."""

    name = "glm45"
    open_ended = False  # its arguments have no closing brace: only the end tag says they are all there
    key, key_end, value, value_end = "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"
    escaped = [re.escape(tag) for tag in (key, key_end, value, value_end)]
    pair = re.compile(r"{}(.*?){}\s*{}(.*?){}".format(*escaped), re.S)  # one argument: its key and value

    @property
    def tags(self) -> tuple[str, ...]:
        return (self.start, self.end, self.key, self.key_end, self.value, self.value_end)

    def _call(self, body: str, tools: tuple[FunctionTool, ...]) -> ParsedCall | None:
        name, _, rest = body.partition(self.key)
        tool = next((t for t in tools if t.name == name.strip()), None)
        if tool is None:
            return None
        pairs = self.pair.findall(self.key + rest if rest else "")
        properties = tool.parameters.get("properties") or {}
        arguments = {key.strip(): _argument(value, properties.get(key.strip())) for key, value in pairs}
        return ParsedCall(tool.name, json.dumps(arguments, ensure_ascii=False))

    def grammar(
        self, tools: tuple[FunctionTool, ...], parallel: bool, tag_ids: dict[str, int] | None = None
    ) -> str:
        tag = {t: _tag(t, tag_ids) for t in self.tags}
        rules = []
        for i, tool in enumerate(tools):
            properties = tool.parameters.get("properties") or {}
            required = set(tool.parameters.get("required") or ())
            pairs = []
            for key, schema in properties.items():
                pair = (
                    f'{tag[self.key]} {_literal(key)} {tag[self.key_end]} "\\n" '
                    f'{tag[self.value]} {_value_rule(schema)} {tag[self.value_end]} "\\n"'
                )
                pairs.append(pair if key in required else f"({pair})?")
            body = " ".join(pairs)
            rules.append(f'call{i}: {tag[self.start]} {_literal(tool.name)} "\\n" {body} {tag[self.end]}')
        options = " | ".join(f"call{i}" for i in range(len(tools)))
        repeat = ' ("\\n" call)*' if parallel else ""
        return f"start: call{repeat}\ncall: {options}\n" + "\n".join(rules) + "\n"


def _is_string(schema: Any) -> bool:
    """Whether a parameter takes text: its type says string, or (untyped) every enum value is text."""
    if not isinstance(schema, dict):
        return False
    kind = schema.get("type")
    if kind is None:
        options = schema.get("enum")
        return isinstance(options, list) and bool(options) and all(isinstance(v, str) for v in options)
    return kind == "string" or (isinstance(kind, list) and "string" in kind)


def _argument(value: str, schema: Any) -> Any:
    """An argument's value as GLM-4.5 writes it: raw text for a string parameter, JSON otherwise (text
    that is not JSON stays text, as a model may write an unquoted word for an undeclared parameter)."""
    if _is_string(schema):
        return value
    try:
        return json.loads(value.strip())
    except json.JSONDecodeError:
        return value


def _value_rule(schema: Any) -> str:
    """A GLM-4.5 argument value: a string parameter's raw text (one of its enum's values where it has
    one), any other parameter's JSON."""
    options = schema.get("enum") if isinstance(schema, dict) else None
    if _is_string(schema) and options is None:
        return r"/[^<]*/"
    if _is_string(schema) and options and all(isinstance(v, str) for v in options):
        return "(" + " | ".join(_literal(v) for v in options) + ")"
    return _schema(schema if isinstance(schema, dict) else {})  # an empty enum: the compiler refuses it


def _tag(tag: str, tag_ids: dict[str, int] | None) -> str:
    """A tag in a grammar: its token where the tokenizer has it as one, else its text."""
    return f"<[{tag_ids[tag]}]>" if tag_ids and tag in tag_ids else _literal(tag)


PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (ToolParser, Llama3JsonParser, Glm4Parser, Glm45Parser)
}


def detect_tool_parser(chat_template: str | None) -> str | None:
    """The family a chat template writes tool calls in, from the markers it renders; None: no tools."""
    if not chat_template or "tools" not in chat_template:
        return None
    if "<arg_key>" in chat_template:  # GLM-4.5 and later: the name after <tool_call>, then key/value tags
        return "glm45"
    if "<tool_call>" in chat_template:
        return "hermes"
    if "<|python_tag|>" in chat_template or "ipython" in chat_template:
        return "llama3_json"
    if "<|observation|>" in chat_template:
        return "glm4"
    return None
