"""Constrained decoding on the real tiny model: outputs match their grammar, batching changes nothing."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
import torch

from shardbento.engine.base import ChatMessage, Constraint, SamplingParams
from shardbento.engine.grammar import unpack_bitmask
from shardbento.errors import InvalidRequest

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["color", "count", "ok", "tags"],
    "additionalProperties": False,
}
CONSTRAINT = Constraint("json_schema", json.dumps(SCHEMA))
PROMPTS = ["Tell me about the sharded bento.", "What is a kernel?", "Name a city.", "Count to ten."]


async def _collect(engine, text: str, params: SamplingParams) -> tuple[str, str | None]:
    prompt = engine.render_chat([ChatMessage(role="user", text=text)])
    deltas = [d async for d in engine.stream(prompt, params, "grammar-test")]
    return "".join(d.text for d in deltas), deltas[-1].finish_reason


def generate(engine, text: str, params: SamplingParams) -> tuple[str, str | None]:
    return asyncio.run(_collect(engine, text, params))


def generate_together(engine, params: list[SamplingParams]) -> list[tuple[str, str | None]]:
    async def together():
        return await asyncio.gather(*(_collect(engine, t, p) for t, p in zip(PROMPTS, params, strict=True)))

    return asyncio.run(together())


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_grammar_output_matches_the_schema_and_ends_with_it(text_engine, temperature: float) -> None:
    params = SamplingParams(max_tokens=80, temperature=temperature, seed=7, constraint=CONSTRAINT)
    for text in PROMPTS:
        output, finish = generate(text_engine, text, params)
        jsonschema.validate(json.loads(output), SCHEMA)
        assert finish == "stop"


def test_grammar_json_object_is_an_object_even_with_ignore_eos(text_engine) -> None:
    constraint = Constraint("json_object")
    params = SamplingParams(max_tokens=60, constraint=constraint, ignore_eos=True, min_tokens=2)
    output, finish = generate(text_engine, PROMPTS[0], params)
    if finish == "stop":  # an unbounded object may run to max_tokens; a finished one must parse
        assert isinstance(json.loads(output), dict)
    else:
        assert output.startswith("{")


def test_grammar_batched_greedy_equals_alone(text_engine) -> None:
    constrained = SamplingParams(max_tokens=60, constraint=CONSTRAINT)
    plain = SamplingParams(max_tokens=20)
    alone = [
        generate(text_engine, text, constrained if i % 2 == 0 else plain) for i, text in enumerate(PROMPTS)
    ]
    together = generate_together(text_engine, [constrained if i % 2 == 0 else plain for i in range(4)])
    assert together == alone
    assert all(json.loads(alone[i][0]) for i in (0, 2))


def test_grammar_seeded_sampling_reproduces(text_engine) -> None:
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=11, constraint=CONSTRAINT)
    assert generate(text_engine, PROMPTS[1], params) == generate(text_engine, PROMPTS[1], params)


def test_grammar_regex_and_lark(text_engine) -> None:
    regex = Constraint("regex", r"(yes|no)", param="grammar")
    output, finish = generate(text_engine, PROMPTS[0], SamplingParams(max_tokens=10, constraint=regex))
    assert output in ("yes", "no") and finish == "stop"
    lark = Constraint("lark", 'start: "id-" /[0-9]{3}/', param="grammar")
    output, _ = generate(text_engine, PROMPTS[1], SamplingParams(max_tokens=10, constraint=lark))
    assert output.startswith("id-") and output[3:].isdigit() and len(output) == 6


@pytest.mark.parametrize(
    "constraint, words",
    [
        (Constraint("json_schema", json.dumps({"type": "objectx"})), "objectx"),
        (
            Constraint("json_schema", '{"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}'),
            "nowhere",
        ),
        (Constraint("json_schema", "{not json"), "cannot be compiled"),
        (Constraint("lark", "start: undefined_rule", param="grammar"), "undefined_rule"),
    ],
)
def test_grammar_that_cannot_compile_is_a_400_naming_the_field(text_engine, constraint, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words) as caught:
        text_engine.check_constraint(constraint)
    assert caught.value.param == constraint.param


def test_grammar_bitmask_unpacks_bit_j_of_word_w_as_token_32w_plus_j() -> None:
    words = torch.zeros((2, 2), dtype=torch.int32)
    words[0, 0] = 1 | (1 << 5)
    words[1, 1] = -(1 << 31)  # only the sign bit: token 63
    allowed = unpack_bitmask(words, 64)
    assert allowed[0].nonzero().flatten().tolist() == [0, 5]
    assert allowed[1].nonzero().flatten().tolist() == [63]
    assert unpack_bitmask(words, 40).shape == (2, 40)
