"""Tool-call formats: each family's parser reads what its grammar forces, streams stop at a call's start."""

from __future__ import annotations

import asyncio
import json

import pytest

from shardbento.engine.base import ChatMessage, Constraint, SamplingParams
from shardbento.tiny.templates import GLM45_CHAT_TEMPLATE
from shardbento.toolcalls import (
    PARSERS,
    FunctionTool,
    Glm4Parser,
    Glm45Parser,
    Llama3JsonParser,
    ToolParser,
    closed,
    detect_tool_parser,
)

WEATHER = FunctionTool(
    "get_weather",
    "Weather now",
    {
        "type": "object",
        "properties": {
            "city": {"enum": ["Paris", "Oslo"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 3},
        },
        "required": ["city", "days"],
    },
)
TIME = FunctionTool(
    "get_time", None, {"type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"]}
)
TOOLS = (WEATHER, TIME)


def test_toolcalls_hermes_parses_content_and_several_calls() -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"utc": true}}\n</tool_call>'
    content, calls = ToolParser().parse(text, TOOLS)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo", "days": 2}),
        ("get_time", {"utc": True}),
    ]
    assert len({c.id for c in calls}) == 2


def test_toolcalls_hermes_unknown_function_or_bad_json_stays_content() -> None:
    for text in (
        '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
        "<tool_call>\n{not json\n</tool_call>",
    ):
        assert ToolParser().parse(text, TOOLS) == (text, [])


def test_toolcalls_hermes_keeps_complete_calls_before_a_cut_off_one() -> None:
    text = '<tool_call>\n{"name": "get_time", "arguments": {"utc": false}}\n</tool_call>\n<tool_call>\n{"name": "get_'
    _, calls = ToolParser().parse(text, TOOLS)
    assert [c.name for c in calls] == ["get_time"]


@pytest.mark.parametrize(
    "text, end",
    [("Hello world", 11), ("Hello <tool", 6), ("Hi <tool_call>\n{", 3), ("<", 0), ("a < b", 5)],
)
def test_toolcalls_hermes_content_end_holds_a_possible_start(text: str, end: int) -> None:
    assert ToolParser().content_end(text, TOOLS) == end


def test_toolcalls_llama3_json_calls_with_and_without_python_tag() -> None:
    parser = Llama3JsonParser()
    for text in (
        '{"name": "get_time", "parameters": {"utc": true}}',
        '<|python_tag|>{"name": "get_time", "parameters": {"utc": true}}; {"name": "get_weather", "parameters": {"city": "Paris", "days": 1}}',
    ):
        content, calls = parser.parse(text, TOOLS)
        assert content == "" and calls[0].name == "get_time"
    assert len(parser.parse(text, TOOLS)[1]) == 2
    assert parser.parse("The answer is 4.", TOOLS) == ("The answer is 4.", [])
    assert parser.content_end("  {", TOOLS) == 0 and parser.content_end("The", TOOLS) == 3


def test_toolcalls_glm4_name_line_then_arguments() -> None:
    parser = Glm4Parser()
    content, calls = parser.parse('get_weather\n{"city": "Paris", "days": 3}', TOOLS)
    assert content == "" and (calls[0].name, json.loads(calls[0].arguments)) == (
        "get_weather",
        {"city": "Paris", "days": 3},
    )
    assert parser.parse("get weather soon\n{}", TOOLS)[1] == []
    assert parser.content_end("get_", TOOLS) == 0  # may still become get_weather
    assert parser.content_end("Sure, here", TOOLS) == len("Sure, here")


NOTE = FunctionTool(
    "save_note",
    None,
    {"type": "object", "properties": {"text": {"type": "string"}, "tags": {"type": "array"}}},
)


def test_toolcalls_glm45_key_value_pairs_typed_by_the_schema() -> None:
    parser = Glm45Parser()
    text = (
        "Checking both.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>\n"
        "<tool_call>save_note\n<arg_key>text</arg_key>\n<arg_value>42</arg_value>\n"
        '<arg_key>tags</arg_key>\n<arg_value>["a", "b"]</arg_value>\n</tool_call>'
    )
    content, calls = parser.parse(text, (*TOOLS, NOTE))
    assert content == "Checking both."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 3}),
        ("save_note", {"text": "42", "tags": ["a", "b"]}),  # a string parameter keeps "42" as text
    ]
    assert parser.parse("<tool_call>launch\n</tool_call>", TOOLS) == ("<tool_call>launch\n</tool_call>", [])
    cut = text.rsplit("<arg_key>tags", 1)[0]  # the second call cut off by max_tokens
    assert [c.name for c in parser.parse(cut, (*TOOLS, NOTE))[1]] == ["get_weather"]
    assert parser.content_end("Sure <tool_", TOOLS) == len("Sure ")


def test_toolcalls_glm45_reads_the_calls_its_template_writes() -> None:
    """A call rendered by GLM-4.5's own template into an earlier turn parses back to the same call."""
    from transformers import AutoTokenizer

    from shardbento.tiny.models import ensure_generated

    tokenizer = AutoTokenizer.from_pretrained(ensure_generated("tiny-glm45"))
    arguments = {"city": "Oslo", "days": 2}
    call = {"type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
    ]
    tools = [t.template_dict() for t in TOOLS]
    rendered = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    turn = rendered.rsplit("<|assistant|>", 1)[1]
    _, calls = Glm45Parser().parse(turn.split("</think>", 1)[1], TOOLS)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", arguments)]


def test_toolcalls_closed_adds_additional_properties_false_where_unsaid() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {}},
            "b": {"type": "object", "additionalProperties": True},
        },
    }
    result = closed(schema)
    assert result["additionalProperties"] is False
    assert result["properties"]["a"]["additionalProperties"] is False
    assert result["properties"]["b"]["additionalProperties"] is True
    assert "additionalProperties" not in schema  # the caller's schema is not changed


@pytest.mark.parametrize("family", sorted(PARSERS))
def test_toolcalls_each_familys_grammar_forces_what_its_parser_reads(text_engine, family: str) -> None:
    parser = PARSERS[family]()
    for tools, parallel in (((WEATHER,), False), (TOOLS, True)):
        constraint = Constraint("lark", parser.grammar(tools, parallel), param="tool_choice")
        text_engine.check_constraint(constraint)
        prompt = text_engine.render_chat([ChatMessage(role="user", text="What is the weather?")])
        params = SamplingParams(max_tokens=120, temperature=1.0, seed=3, constraint=constraint)

        deltas = asyncio.run(collect(text_engine, prompt, params))
        text = "".join(d.text for d in deltas)
        _, calls = parser.parse(text, tools)
        assert calls, text
        assert {c.name for c in calls} <= {t.name for t in tools}
        if not parallel:
            assert len(calls) == 1 and deltas[-1].finish_reason == "stop"


async def collect(engine, prompt, params):
    return [d async for d in engine.stream(prompt, params, "tool-grammar")]


def test_toolcalls_detected_from_the_chat_template() -> None:
    assert detect_tool_parser("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert detect_tool_parser("{% if tools %}<|python_tag|>{% endif %}") == "llama3_json"
    assert detect_tool_parser("{% if tools %}<|observation|>{% endif %}") == "glm4"
    assert detect_tool_parser(GLM45_CHAT_TEMPLATE) == "glm45"  # <tool_call> too, but key/value tags
    assert detect_tool_parser("{{ messages }}") is None and detect_tool_parser(None) is None
    assert text_template_family() == "hermes"


def text_template_family() -> str | None:
    from shardbento.tiny.tokenizer import chat_template

    return detect_tool_parser(chat_template(False))


def test_toolcalls_catalog_tool_parser_wins_over_the_template(text_engine) -> None:
    from shardbento.engine.hf.preprocess import load_preprocessor
    from shardbento.plan.source import resolve_source

    spec = text_engine.spec
    assert text_engine.info.tool_parser == "hermes"  # detected from the tiny models' template
    named = spec.model_copy(update={"tool_parser": "glm4"})
    assert load_preprocessor(named, resolve_source(named)).tool_parser == "glm4"
