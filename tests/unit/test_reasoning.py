"""The reasoning splitter (every split point of a text gives the whole text's answer), template
detection, and the grammar that constrains only the answer (compiled and run by llguidance)."""

from __future__ import annotations

import json

import pytest

from shardbento.reasoning import (
    Reasoning,
    after_reasoning,
    closes_in_prompt,
    detect_reasoning_parser,
    opens_in_prompt,
    split_reasoning,
)
from shardbento.tiny.templates import GLM45_CHAT_TEMPLATE, QWEN3_CHAT_TEMPLATE

CASES = [
    ("<think>\nI think.\n</think>\n\nAnswer.", False, ("I think.", "Answer.")),
    ("\nI think.\n</think>\n\nAnswer.", True, ("I think.", "Answer.")),
    ("Plain answer, no </think> block", False, (None, "Plain answer, no </think> block")),
    ("<think>cut off by max_tokens\n", False, ("cut off by max_tokens", "")),
    ("  <thin", False, (None, "  <thin")),
    ("abc</think>def", True, ("abc", "def")),
    ("a\n\nb</think>", True, ("a\n\nb", "")),
    ("<think></think>{}", False, ("", "{}")),
    ("x </thinking> y", True, ("x </thinking> y", "")),
]


def streamed(text: str, reasoning: Reasoning, cuts: list[int]) -> tuple[str | None, str]:
    splitter = reasoning.splitter()
    thought = content = ""
    start = 0
    for cut in [*cuts, len(text)]:
        piece = splitter.push(text[start:cut])
        thought, content, start = thought + piece.reasoning, content + piece.content, cut
    last = splitter.finish()
    return (thought + last.reasoning if splitter.saw_block else None), content + last.content


@pytest.mark.parametrize(("text", "opened", "expected"), CASES)
def test_reasoning_every_split_gives_the_whole_texts_answer(text, opened, expected) -> None:
    reasoning = Reasoning("qwen3", opened)
    assert split_reasoning(text, reasoning) == expected
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            assert streamed(text, reasoning, [i, j]) == expected, (i, j)


def test_reasoning_counts_tokens_until_the_block_ends() -> None:
    splitter = Reasoning("qwen3", False).splitter()
    for text, tokens in (("<think>", 1), ("hm", 2), ("</think>", 1), ("\n\nok", 2)):
        splitter.push(text, tokens)
    assert splitter.reasoning_tokens == 4


def test_reasoning_detected_from_templates() -> None:
    assert detect_reasoning_parser(QWEN3_CHAT_TEMPLATE) == "qwen3"
    assert detect_reasoning_parser("{{'<｜Assistant｜><think>\\n'}}{# </think> #}") == "deepseek_r1"
    assert detect_reasoning_parser("[gMASK]<sop>{{'<|assistant|>'}}{# </think> #}") == "glm45"
    assert detect_reasoning_parser(GLM45_CHAT_TEMPLATE) == "glm45"
    assert detect_reasoning_parser("<|im_start|>{{ m }}<tool_call>") is None
    assert detect_reasoning_parser(None) is None


def test_reasoning_prompt_closes_block_when_thinking_is_off() -> None:
    assert closes_in_prompt("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3
    assert closes_in_prompt("/nothink<|assistant|>\n<think></think>")  # GLM-4.5
    assert not closes_in_prompt("<|im_start|>assistant\n<think>\n")
    assert not closes_in_prompt("</think>\nSure.<|im_end|>\n<|im_start|>assistant\n")  # an earlier turn's


def test_reasoning_grammar_allows_no_block_when_the_prompt_closed_one() -> None:
    think, end = vocab("tiny-glm45")[2]
    closed = after_reasoning("json_schema", SCHEMA, Reasoning("glm45", False, (think, end), closed=True))
    assert accepts("tiny-glm45", closed, ("\n", '{"kind":"cat"}'))
    assert accepts("tiny-glm45", closed, ('{"kind":"dog"}',))
    assert not accepts("tiny-glm45", closed, (think, "x", end, '{"kind":"cat"}'))


def test_reasoning_prompt_opens_block() -> None:
    assert opens_in_prompt("<|im_start|>assistant\n<think>\n")
    assert not opens_in_prompt("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not opens_in_prompt("<|im_start|>assistant\n")


def test_reasoning_unknown_parser_refused_by_name() -> None:
    from shardbento.catalog import ModelSpec

    with pytest.raises(ValueError, match="'mistral' is not implemented here; implemented: deepseek_r1"):
        ModelSpec(name="m", source="x", kind="text", reasoning_parser="mistral")
    with pytest.raises(ValueError, match="unknown reasoning parser 'nope'"):
        ModelSpec(name="m", source="x", kind="text", reasoning_parser="nope")


VOCABS: dict[str, tuple] = {}


def vocab(recipe: str):
    """The recipe's tokenizer, llguidance's view of it, and the tag ids where the tags are tokens."""
    if recipe not in VOCABS:
        import llguidance
        from transformers import AutoTokenizer

        from shardbento.tiny.models import ensure_generated

        tokenizer = AutoTokenizer.from_pretrained(ensure_generated(recipe))
        ll = llguidance.LLTokenizer(
            tokenizer.backend_tokenizer.to_str(), n_vocab=len(tokenizer), eos_token=[2]
        )
        ids = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
        tags = tuple(ids) if None not in ids and tokenizer.unk_token_id not in ids else None
        VOCABS[recipe] = (tokenizer, ll, tags)
    return VOCABS[recipe]


def accepts(recipe: str, grammar: str, parts: tuple[str | int, ...]) -> bool:
    import llguidance

    tokenizer, ll, _ = vocab(recipe)
    ids: list[int] = []
    for part in parts:
        ids += [part] if isinstance(part, int) else tokenizer.encode(part, add_special_tokens=False)
    matcher = llguidance.LLMatcher(ll, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return matcher.consume_tokens(ids) and matcher.is_accepting()


SCHEMA = json.dumps(
    {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}}, "required": ["kind"]}
)


# tags as tokens (Qwen3's, GLM-4.5's) / spelled as text
@pytest.mark.parametrize("recipe", ["tiny-qwen3", "tiny-glm45", "tiny-llama"])
def test_reasoning_grammar_frees_the_reasoning_and_constrains_the_answer(recipe: str) -> None:
    tags = vocab(recipe)[2]
    assert (tags is not None) == (recipe != "tiny-llama")
    think, end = tags or ("<think>", "</think>")
    optional = after_reasoning("json_schema", SCHEMA, Reasoning("qwen3", False, tags))
    assert accepts(recipe, optional, (think, "\nfree { text\n", end, "\n\n", '{"kind":"cat"}'))
    assert accepts(recipe, optional, ("\n", think, "x", end, "\n", '{"kind":"cat"}'))  # GLM's turn start
    assert not accepts(recipe, optional, ("\n\n", think, "x", end, '{"kind":"cat"}'))
    assert accepts(recipe, optional, ('{"kind":"dog"}',))
    assert not accepts(recipe, optional, (think, "x", end, "not json"))
    opened = after_reasoning("json_schema", SCHEMA, Reasoning("qwen3", True, tags))
    assert accepts(recipe, opened, ("free text", end, '{"kind":"cat"}'))
    assert not accepts(recipe, opened, ('{"kind":"cat"}',))  # the prompt's block must close first


def test_reasoning_grammar_keeps_a_lark_constraint_as_the_answer() -> None:
    tags = vocab("tiny-qwen3")[2]
    grammar = after_reasoning("lark", 'start: "yes" | "no"\n', Reasoning("qwen3", False, tags))
    assert accepts("tiny-qwen3", grammar, (tags[0], "hm", tags[1], "no"))
    assert not accepts("tiny-qwen3", grammar, (tags[0], "hm", tags[1], "maybe"))
    with pytest.raises(ValueError, match="no `start:` rule"):
        after_reasoning("lark", "answer: 'x'", Reasoning("qwen3", False, tags))
