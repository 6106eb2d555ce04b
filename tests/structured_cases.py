"""The structured-output cases both engines' tests send, and their judges (re, jsonschema, the lark
parser: none of them llguidance, which constrains the output)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

CHOICES = ["alpha", "beta", "gamma delta"]
REGEX = r"[0-9]{3}-(red|green|blue)"
# One language, written as Lark (for us and for the lark library) and as GBNF (llama.cpp's syntax).
LARK = 'start: greeting ", " NAME "!"\ngreeting: "hello" | "good " ("morning" | "evening")\nNAME: /[A-Z][a-z]{1,7}/\n'
GBNF = 'root ::= greeting ", " name "!"\ngreeting ::= "hello" | "good " ("morning" | "evening")\nname ::= [A-Z] [a-z]{1,7}\n'
SCHEMA = {
    "type": "object",
    "properties": {"kind": {"enum": ["cat", "dog"]}, "age": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["kind", "age"],
}
# A case's name and the value its structured_outputs field takes (gbnf goes in `grammar` too).
KINDS = {"choice": CHOICES, "regex": REGEX, "grammar": LARK, "gbnf": GBNF, "json": SCHEMA}
ALIASES = {
    "guided_choice": "choice",
    "guided_regex": "regex",
    "guided_grammar": "gbnf",
    "guided_json": "json",
}


def structured(kind: str) -> dict:
    return {"structured_outputs": {"grammar" if kind == "gbnf" else kind: KINDS[kind]}}


def check_output(kind: str, text: str) -> None:
    """The output is in the case's language."""
    if kind == "choice":
        assert text in CHOICES
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind in ("grammar", "gbnf"):
        lark = pytest.importorskip("lark", reason="lark (env/dev.txt) judges the grammar outputs")
        lark.Lark(LARK, parser="earley").parse(text)
    else:
        jsonschema.validate(json.loads(text), {**SCHEMA, "additionalProperties": False})
