"""Which grammar library constrains decoding here: mask time per step at batch 32, 150k-token vocabulary.

Run with an interpreter that has the libraries (`.venv-vllm/bin/python`, where vLLM installs xgrammar,
llguidance and outlines-core): each one that imports is measured on the same synthetic byte-level BPE
vocabulary and the same JSON schema. Every step, every sequence of the batch gets its next-token mask, a
random allowed token is chosen and the matcher advances with it, as the scheduler would.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}


def synthetic_tokenizer(vocab_size: int, seed: int = 0) -> Any:
    """A byte-level BPE tokenizer of `vocab_size` tokens: the 256 bytes, then merges of random pairs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    short = list(alphabet)
    while len(vocab) < vocab_size - 1:
        a, b = rng.choice(short), rng.choice(short)
        if a + b in vocab:
            continue
        vocab[a + b] = len(vocab)
        merges.append((a, b))
        if len(a + b) < 8:
            short.append(a + b)
    vocab["<eos>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


class Backend:
    name: str

    def compile_time_s(self) -> float: ...

    def new_matchers(self, batch: int) -> list[Any]: ...

    def fill(self, matchers: list[Any], bitmask: Any) -> None: ...

    def advance(self, matcher: Any, token: int) -> None: ...

    def done(self, matcher: Any) -> bool: ...


class Llguidance(Backend):
    name = "llguidance"

    def __init__(self, tokenizer: Any) -> None:
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        started = time.perf_counter()
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer)
        self.tokenizer_s = time.perf_counter() - started
        self.executor = llguidance.LLExecutor()

    def compile_time_s(self) -> float:
        started = time.perf_counter()
        self.grammar = self.ll.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
        matcher = self.ll.LLMatcher(self.tokenizer, self.grammar)
        assert not matcher.is_error(), matcher.get_error()
        return time.perf_counter() - started

    def new_matchers(self, batch: int) -> list[Any]:
        return [self.ll.LLMatcher(self.tokenizer, self.grammar) for _ in range(batch)]

    def fill(self, matchers: list[Any], bitmask: Any) -> None:
        self.executor.unsafe_compute_mask_ptr(
            [(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(), bitmask.shape[1] * 4, len(matchers)
        )

    def advance(self, matcher: Any, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()

    def done(self, matcher: Any) -> bool:
        return matcher.is_stopped()


class Xgrammar(Backend):
    name = "xgrammar"

    def __init__(self, tokenizer: Any) -> None:
        import xgrammar

        self.xgr = xgrammar
        started = time.perf_counter()
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2)
        self.tokenizer_s = time.perf_counter() - started

    def compile_time_s(self) -> float:
        started = time.perf_counter()
        self.compiled = self.compiler.compile_json_schema(json.dumps(SCHEMA))
        return time.perf_counter() - started

    def new_matchers(self, batch: int) -> list[Any]:
        return [self.xgr.GrammarMatcher(self.compiled) for _ in range(batch)]

    def fill(self, matchers: list[Any], bitmask: Any) -> None:
        for i, matcher in enumerate(matchers):
            matcher.fill_next_token_bitmask(bitmask, i)

    def advance(self, matcher: Any, token: int) -> None:
        assert matcher.accept_token(token)

    def done(self, matcher: Any) -> bool:
        return matcher.is_terminated()


class OutlinesCore(Backend):
    name = "outlines-core"

    def __init__(self, tokenizer: Any) -> None:
        import outlines_core

        self.oc = outlines_core
        started = time.perf_counter()
        vocab: dict[str, list[int]] = {}
        for token, token_id in tokenizer.get_vocab().items():
            if token_id != tokenizer.eos_token_id:
                vocab.setdefault(token, []).append(token_id)
        self.vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_id, vocab)
        self.tokenizer_s = time.perf_counter() - started

    def compile_time_s(self) -> float:
        started = time.perf_counter()
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
        self.index = self.oc.Index(regex, self.vocabulary)
        return time.perf_counter() - started

    def new_matchers(self, batch: int) -> list[Any]:
        return [self.oc.Guide(self.index) for _ in range(batch)]

    def fill(self, matchers: list[Any], bitmask: Any) -> None:
        for i, guide in enumerate(matchers):
            guide.write_mask_into(bitmask[i].data_ptr(), bitmask.shape[1], 4)

    def advance(self, matcher: Any, token: int) -> None:
        matcher.advance(token)

    def done(self, matcher: Any) -> bool:
        return matcher.is_finished()


def allowed(bitmask_row: Any, vocab_size: int) -> list[int]:
    import torch

    bits = (bitmask_row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return torch.nonzero(bits.flatten()[:vocab_size]).flatten().tolist()


def measure(backend: Backend, vocab_size: int, batch: int, steps: int, seed: int) -> dict[str, float]:
    import torch

    first = backend.compile_time_s()
    second = backend.compile_time_s()  # nothing cached by us; the library's own cache, if any
    rng = random.Random(seed)
    matchers = backend.new_matchers(batch)
    bitmask = torch.full((batch, (vocab_size + 31) // 32), -1, dtype=torch.int32)
    times = []
    for _ in range(steps):
        live = [m for m in matchers if not backend.done(m)]
        if not live:
            break
        started = time.perf_counter()
        backend.fill(live, bitmask)
        times.append(time.perf_counter() - started)
        for i, matcher in enumerate(live):
            backend.advance(matcher, rng.choice(allowed(bitmask[i], vocab_size)))
    return {
        "tokenizer_s": backend.tokenizer_s,  # type: ignore[attr-defined]
        "compile_first_ms": first * 1e3,
        "compile_again_ms": second * 1e3,
        "mask_ms_mean": statistics.fmean(times) * 1e3,
        "mask_ms_median": statistics.median(times) * 1e3,
        "mask_ms_p90": sorted(times)[int(0.9 * len(times))] * 1e3,
        "steps": len(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vocab", type=int, default=150_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    tokenizer = synthetic_tokenizer(args.vocab)
    backends: list[Callable[[Any], Backend]] = [Llguidance, Xgrammar, OutlinesCore]
    for make in backends:
        try:
            backend = make(tokenizer)
        except ImportError as exc:
            print(f"{make.__name__}: not installed ({exc})")
            continue
        print(
            backend.name, json.dumps(measure(backend, args.vocab, args.batch, args.steps, seed=0)), flush=True
        )


if __name__ == "__main__":
    main()
