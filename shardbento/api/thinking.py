"""Serving's side of thinking models: whether a prompt opened the reasoning block, the constraint moved
after the reasoning, `reasoning_effort` refused where no reasoning is split, and whole answers split."""

from __future__ import annotations

import dataclasses

import anyio

from shardbento.api.request import Completion, Generation, GenerationRequest
from shardbento.engine.base import Constraint, Engine, FinishReason, SamplingParams, TokenLogprob
from shardbento.errors import InvalidRequest
from shardbento.reasoning import (
    THINK_END,
    THINK_START,
    Reasoning,
    after_reasoning,
    closes_in_prompt,
    opens_in_prompt,
)

PROMPT_TAIL_TOKENS = 16  # enough for every template's `<think>\n` or `<think>\n\n</think>\n\n`


def check_reasoning_effort(engine: Engine, request: GenerationRequest, model: str) -> None:
    if request.reasoning_effort is not None and engine.info.reasoning_parser is None:
        raise InvalidRequest(
            f"model {model!r} has no reasoning output (no reasoning_parser in its catalog entry, none "
            "detected in its chat template); remove reasoning_effort",
            param="reasoning_effort",
        )


async def prompt_reasoning(
    engine: Engine, request: GenerationRequest, token_ids: tuple[int, ...]
) -> Reasoning | None:
    """How a chat request's output splits, from the end of its rendered prompt; raw prompts are not split."""
    parser = engine.info.reasoning_parser
    if parser is None or request.messages is None:
        return None
    return await anyio.to_thread.run_sync(_reasoning, engine, parser, token_ids)


def _reasoning(engine: Engine, parser: str, token_ids: tuple[int, ...]) -> Reasoning:
    tail = engine.decode(list(token_ids[-PROMPT_TAIL_TOKENS:]))
    ids = tag_ids(engine, (THINK_START, THINK_END))
    pair = (ids[THINK_START], ids[THINK_END]) if len(ids) == 2 else None
    return Reasoning(parser, opens_in_prompt(tail), pair, closed=closes_in_prompt(tail))


def tag_ids(engine: Engine, tags: tuple[str, ...]) -> dict[str, int]:
    """The ids of the tags (`<think>`, `<tool_call>`) that the tokenizer has as one token each."""
    ids = {}
    for tag in tags:
        found = [i for i in engine.encode(tag).token_ids if engine.decode([i]) == tag]
        if found:
            ids[tag] = found[0]
    return ids


def constrain_answer(params: SamplingParams, reasoning: Reasoning | None) -> SamplingParams:
    """The constraint applied to the answer alone: the grammar lets the reasoning block come first."""
    constraint = params.constraint
    if reasoning is None or constraint is None:
        return params
    try:
        grammar = after_reasoning(constraint.kind, constraint.source, reasoning)
    except ValueError as exc:
        raise InvalidRequest(f"{constraint.param} cannot be compiled: {exc}", param=constraint.param) from exc
    return dataclasses.replace(params, constraint=Constraint("lark", grammar, constraint.param))


async def read_completion(generation: Generation) -> Completion:
    """A started generation read to its end: reasoning split off, then tool calls parsed from the answer."""
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    num_tokens = 0
    finish: FinishReason = "length"
    splitter = generation.reasoning.splitter() if generation.reasoning is not None else None
    thought: list[str] = []
    scored: list[TokenLogprob] | None = None
    async for delta in generation.deltas:
        num_tokens += len(delta.token_ids)
        logprobs.extend(delta.logprobs)
        scored = delta.prompt_logprobs if delta.prompt_logprobs is not None else scored
        finish = delta.finish_reason or finish
        if splitter is None:
            parts.append(delta.text)
            continue
        split = splitter.push(delta.text, len(delta.token_ids))
        thought.append(split.reasoning)
        parts.append(split.content)
    completion = Completion("", finish, generation.prompt.num_tokens, num_tokens, logprobs)
    completion.prompt_logprobs = scored
    if splitter is not None:
        last = splitter.finish()
        thought.append(last.reasoning)
        parts.append(last.content)
        completion.reasoning = "".join(thought) if splitter.saw_block else None
        completion.reasoning_tokens = splitter.reasoning_tokens
    completion.text = "".join(parts)
    if generation.tool_use is not None:
        use = generation.tool_use
        completion.text, completion.tool_calls = use.parser.parse(completion.text, use.tools.tools)
        if completion.tool_calls:
            completion.finish_reason = "tool_calls"
    return completion
