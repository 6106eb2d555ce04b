"""A thinking model's reasoning split from its answer: whole texts and streams, the family detected from
its chat template, and the grammar that lets a constrained answer follow the reasoning.

Every implemented family writes its reasoning between `<think>` and `</think>` before the answer; they
differ in who opens the block. Qwen3's model writes `<think>` itself (its template closes an empty block
in the prompt when `enable_thinking` is false); DeepSeek-R1's newer templates and GLM-Z1's end the
prompt with `<think>`, so the output holds only the `</think>`. Which case a request is in is read from
its rendered prompt (`opens_in_prompt`), not guessed from the output: a stream cannot take back text it
already sent as content.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

from shardbento.textmatch import held_suffix

THINK_START, THINK_END = "<think>", "</think>"

# vLLM's --reasoning-parser names this server implements (all `<think>...</think>`), and the ones it
# knows of but does not (their formats differ: other tags, channels, or no fixed tags at all).
REASONING_PARSERS = ("deepseek_r1", "qwen3", "glm45")
UNIMPLEMENTED_PARSERS = (
    "deepseek_v3",
    "ernie45",
    "gpt_oss",
    "granite",
    "hunyuan_a13b",
    "kimi_k2",
    "minimax_m2",
    "mistral",
    "olmo3",
    "seed_oss",
    "step3",
)

State = Literal["start", "reasoning", "after", "content"]


def detect_reasoning_parser(chat_template: str | None) -> str | None:
    """The family a chat template's markers name, or None when they name none unambiguously."""
    if not chat_template or THINK_END not in chat_template:
        return None
    if "<｜Assistant｜>" in chat_template:  # DeepSeek's full-width role tags
        return "deepseek_r1"
    if "<|im_start|>" in chat_template:  # Qwen3 (hybrid and thinking-only releases), QwQ
        return "qwen3"
    if "[gMASK]" in chat_template:
        return "glm45"
    return None


def opens_in_prompt(prompt_tail: str) -> bool:
    """Whether the rendered prompt ends inside a reasoning block (the template wrote `<think>` last)."""
    return prompt_tail.rfind(THINK_START) > prompt_tail.rfind(THINK_END)


def closes_in_prompt(prompt_tail: str) -> bool:
    """Whether the rendered prompt ends with a closed block: the template switched thinking off
    (Qwen3's `<think>\n\n</think>\n\n`, GLM-4.5's `<think></think>`), so the output is all answer."""
    return prompt_tail.rstrip().endswith(THINK_END)


@dataclass(frozen=True, slots=True)
class Reasoning:
    """How one started generation's output splits: its family, whether the prompt opened the block, and
    the tags' token ids where the tokenizer has each as one token (grammars must name those tokens)."""

    parser: str
    opened: bool
    tag_ids: tuple[int, int] | None = None
    closed: bool = False  # the prompt ends with an empty block: thinking is off (constraints allow none)

    def splitter(self) -> ReasoningSplitter:
        return ReasoningSplitter(self.opened)


@dataclass(frozen=True, slots=True)
class Split:
    reasoning: str = ""
    content: str = ""


class ReasoningSplitter:
    """Output text in, (reasoning, content) pieces out, in stream order. Text that may still become a
    tag (`</thi` at a delta's end) is held until the next delta decides; `finish` releases it.

    The reasoning block counts only at the output's start (after whitespace); the newlines the
    templates put around it (`<think>\\n`, `\\n</think>\\n\\n`) belong to neither side.
    """

    def __init__(self, opened: bool) -> None:
        self.state: State = "reasoning" if opened else "start"
        self.saw_block = opened  # whether the output had a reasoning block (else reasoning is None)
        self.reasoning_tokens = 0  # tokens of the pushes made before the reasoning ended
        self._held = ""
        self._sent_reasoning = False

    @property
    def in_reasoning(self) -> bool:
        return self.state in ("start", "reasoning")

    def push(self, text: str, num_tokens: int = 0) -> Split:
        """The next piece of output (`num_tokens` of them, counted as reasoning while it lasts)."""
        thinking = self.in_reasoning
        split = self._push(text)
        if thinking and self.saw_block:
            self.reasoning_tokens += num_tokens
        return split

    def _push(self, text: str) -> Split:
        held, self._held = self._held + text, ""
        if self.state == "start":
            return self._start(held)
        if self.state == "reasoning":
            return self._reasoning(held)
        if self.state == "after":
            return self._after(held)
        return Split(content=held)

    def finish(self) -> Split:
        """What was held when the output ended: a tag never completed is plain text."""
        held, self._held = self._held, ""
        if self.state == "reasoning":
            return Split(reasoning=held.rstrip("\n") if held.strip("\n") else "")
        if self.state == "after":
            return Split()
        return Split(content=held)

    def _start(self, text: str) -> Split:
        head = text.lstrip()
        if not head or (THINK_START.startswith(head) and head != THINK_START):
            self._held = text
            return Split()
        if head.startswith(THINK_START):
            self.state, self.saw_block = "reasoning", True
            return self._reasoning(head[len(THINK_START) :])
        self.state = "content"
        return Split(content=text)

    def _reasoning(self, text: str) -> Split:
        if not self._sent_reasoning:
            text = text.lstrip("\n")
        at = text.find(THINK_END)
        if at >= 0:
            self.state = "after"
            rest = self._after(text[at + len(THINK_END) :])
            return Split(reasoning=text[:at].rstrip("\n"), content=rest.content)
        keep = held_suffix(text, [THINK_END])
        body = text[: len(text) - keep]
        newlines = len(body) - len(body.rstrip("\n"))
        keep += newlines  # trailing newlines wait: they are dropped if `</think>` follows them
        self._held = text[len(text) - keep :]
        body = text[: len(text) - keep]
        self._sent_reasoning = self._sent_reasoning or bool(body)
        return Split(reasoning=body)

    def _after(self, text: str) -> Split:
        text = text.lstrip("\n")
        if text:
            self.state = "content"
        return Split(content=text)


def split_reasoning(text: str, reasoning: Reasoning) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole output: the stream's split, fed in one piece."""
    splitter = reasoning.splitter()
    first, last = splitter.push(text), splitter.finish()
    thought = first.reasoning + last.reasoning
    return (thought if splitter.saw_block else None), first.content + last.content


# --- constrained answers after the reasoning ----------------------------------------------------

COMPACT_JSON = {"whitespace_flexible": False}  # as engine/grammar.py compiles response formats


def answer_rule(kind: str, source: str) -> str:
    """A constraint (engine/base.py's kinds) as Lark rules whose start symbol is `answer`."""
    if kind == "json_schema":
        return f"answer: %json {json.dumps({**json.loads(source), 'x-guidance': COMPACT_JSON})}\n"
    if kind == "json_object":
        return f"answer: %json {json.dumps({'type': 'object', 'x-guidance': COMPACT_JSON})}\n"
    if kind == "regex":
        return "answer: /" + source.replace("/", "\\/") + "/\n"
    # A Lark grammar: its start rule becomes `answer` (a grammar that refers back to `start` is refused
    # by the compiler as a missing rule, never silently changed).
    renamed, count = re.subn(r"^start(\s*):", r"answer\1:", source, count=1, flags=re.M)
    if not count:
        raise ValueError("the grammar has no `start:` rule")
    return renamed if renamed.endswith("\n") else renamed + "\n"


def after_reasoning(kind: str, source: str, reasoning: Reasoning) -> str:
    """A Lark grammar that lets the model think freely first and constrains only the answer.

    When the prompt opened the block the model must close it before answering; when it closed an empty
    one (thinking switched off: Qwen3's and GLM-4.5's `enable_thinking: false`) there is no block; else
    the block is optional and one newline may come before it (GLM-4.5's turns begin `\n<think>`). At
    most two newlines may follow it.
    Where the tags are single tokens (Qwen3, DeepSeek-R1, GLM), the grammar names those tokens:
    llguidance keeps added tokens of the form <...> out of text, so a text "</think>" would force the
    model to spell the tag in pieces it was never trained to write.
    """
    lead_rule = "think_lead: /\\n/\n"
    if reasoning.closed:  # thinking switched off in the prompt: no block, the answer at once
        return "start: think_lead? answer\n" + lead_rule + answer_rule(kind, source)
    if reasoning.tag_ids is not None:
        open_tag, close_tag = (f"<[{i}]>" for i in reasoning.tag_ids)
        block = f"think_text? {close_tag} think_gap?"
        body = "think_text: /(?s:.+)/\n"
        if not reasoning.opened:
            block = f"({open_tag} {block})?"
    else:
        block = "think_text think_gap?" if reasoning.opened else "(think_text think_gap?)?"
        tag = "" if reasoning.opened else "<think>"
        body = f"think_text[lazy]: /(?s:{tag}.*<\\/think>)/\n"
    lead = "" if reasoning.opened else "think_lead? "
    start = f"start: {lead}{block} answer\n{body}"
    return start + lead_rule + "think_gap: /\\n\\n?/\n" + answer_rule(kind, source)
