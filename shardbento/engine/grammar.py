"""Constrained decoding with llguidance: grammars compiled and cached, one batch bitmask per step.

Why llguidance (measured here, `benchmarks/grammar_backends.py`, docs/structure.md): the lowest mean mask
time at batch 32 over a 150k-token vocabulary, a schema compiles in about a millisecond (it builds lazily),
and its CPU wheel is 3 MB with no dependencies (xgrammar pulls torch, triton and a TVM runtime).
"""

from __future__ import annotations

import functools
import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from shardbento.engine.base import Constraint
from shardbento.errors import InvalidRequest

# Compact JSON (no free whitespace): a model may otherwise pad with spaces and newlines until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False}


def grammar_text(constraint: Constraint) -> str:
    """The llguidance grammar for a constraint (not yet checked against the vocabulary)."""
    import llguidance

    if constraint.kind == "json_schema":
        schema = json.loads(constraint.source)
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if constraint.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if constraint.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(constraint.source)
    if constraint.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(constraint.source)
    if constraint.kind in ("grammar", "choice"):
        # As vLLM's guidance backend reads them: a grammar is Lark when it has a `start:` rule (or
        # `%llguidance`), else GBNF converted to Lark; a choice is a JSON list of the allowed outputs.
        return llguidance.grammar_from(constraint.kind, constraint.source)
    raise InvalidRequest(f"unknown constraint kind {constraint.kind!r}", param=constraint.param)


class Grammars:
    """One engine's grammar compiler: the vocabulary converted once, grammars compiled once per text.

    `logits_width` is the model's output width (it may pad past the tokenizer): every id past the
    tokenizer's vocabulary is masked out.
    """

    def __init__(self, tokenizer: Any, eos_ids: set[int] | frozenset[int], logits_width: int) -> None:
        self._tokenizer = tokenizer
        self._eos_ids = sorted(eos_ids)
        self.logits_width = logits_width
        self._lock = threading.Lock()
        self._ll_tokenizer: Any = None
        self._compiled = functools.lru_cache(maxsize=256)(self._compile)
        self._masker: ThreadPoolExecutor | None = None
        self._executor: Any = None
        self._mask_width = max(logits_width, len(tokenizer))  # ids past the tokenizer: always masked

    def _vocabulary(self) -> Any:
        """The tokenizer as llguidance sees it (about a second for a 150k vocabulary): made once."""
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance

                backend = self._tokenizer.backend_tokenizer
                self._ll_tokenizer = llguidance.LLTokenizer(
                    backend.to_str(), n_vocab=self._mask_width, eos_token=self._eos_ids or None
                )
                if torch.cuda.is_available():
                    self._executor = llguidance.LLExecutor()
            return self._ll_tokenizer

    def check(self, constraint: Constraint) -> None:
        """Compile (cached); a grammar the library refuses is a 400 naming the field and the reason."""
        self._compiled(constraint)

    def _compile(self, constraint: Constraint) -> Any:
        """A fresh matcher for the constraint, never advanced: each request's matcher is a copy of it."""
        import llguidance

        try:
            text = grammar_text(constraint)
        except (ValueError, json.JSONDecodeError) as exc:
            raise InvalidRequest(
                f"{constraint.param} cannot be compiled: {exc}", param=constraint.param
            ) from exc
        prototype = llguidance.LLMatcher(self._vocabulary(), text, log_level=0)
        if prototype.is_error():
            raise InvalidRequest(
                f"{constraint.param} cannot be compiled: {prototype.get_error()}", param=constraint.param
            )
        return prototype

    def matcher(self, constraint: Constraint) -> Any:
        """The request's own grammar state: a copy of the compiled one (no second compile)."""
        return self._compiled(constraint).deep_copy()

    def allowed(self, matchers: list[Any]) -> torch.Tensor:
        """[len(matchers), logits_width] booleans: the tokens each matcher allows next.

        Where the model runs on a GPU, llguidance's executor computes the batch on the idle CPU cores
        in one call; where the model's forward has the cores (CPU serving), the matchers go one after
        the other on this thread: with the executor's worker pool competing with the model's threads, constrained
        throughput was 0.84x of unconstrained on two cores, 0.86-0.94x this way (docs/benchmarks.md)."""
        words = (self._mask_width + 31) // 32
        bitmask = torch.zeros((len(matchers), words), dtype=torch.int32)
        address = bitmask.data_ptr()
        if self._executor is not None:
            self._executor.unsafe_compute_mask_ptr(
                [(m, i) for i, m in enumerate(matchers)], address, words * 4, len(matchers)
            )
        else:
            for i, matcher in enumerate(matchers):
                matcher.unsafe_compute_mask_ptr(address + i * words * 4, words * 4)
        return unpack_bitmask(bitmask, self.logits_width)

    def allowed_soon(self, matchers: list[Any]) -> Future[torch.Tensor]:
        """allowed() on the grammar thread, so the masks are made while the model's forward runs
        (llguidance releases the GIL); the matchers must not advance before the result is taken."""
        with self._lock:
            if self._masker is None:
                self._masker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardbento-grammar")
        return self._masker.submit(self.allowed, matchers)


_BITS = torch.arange(32, dtype=torch.int32)


def unpack_bitmask(bitmask: torch.Tensor, width: int) -> torch.Tensor:
    """int32 words, bit j of word w = token 32w + j, into booleans [rows, width]."""
    bits = (bitmask.unsqueeze(-1) >> _BITS) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :width].bool()


def mask_disallowed(logits: torch.Tensor, allowed: torch.Tensor) -> None:
    """In place: -inf for every token of `logits` ([rows, vocab]) that `allowed` ([rows, width]
    booleans) leaves out, and for every id past its width."""
    width = min(logits.shape[-1], allowed.shape[-1])
    logits[:, width:] = float("-inf")
    logits[:, :width].masked_fill_(~allowed[:, :width].to(logits.device), float("-inf"))
