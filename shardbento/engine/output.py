"""Incremental detokenization and stop handling: token ids in, safe text deltas out."""

from __future__ import annotations

import re
from typing import Any, Protocol

from shardbento.engine.base import Delta, SamplingParams, TokenLogprob
from shardbento.textmatch import held_suffix

# Decode a few prompt tokens with the first outputs so tokenizers that mark word starts
# (SentencePiece's leading space) render the first generated word as they would mid-text.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"
# A byte-fallback token (SentencePiece's "<0xE4>"): the bytes after it may change how it reads ("u" alone,
# "\ufffd\ufffd" with an invalid byte after it in a tokenizer that replaces a whole invalid run), so a delta is
# only sure once a run of them has ended (a skipped special between two bytes does not end it).
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class Decoder(Protocol):
    all_special_ids: list[int]

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...

    def convert_ids_to_tokens(self, ids: int) -> str | None: ...


class IncrementalDetokenizer:
    """Turns token ids into text deltas; never emits half of a multi-byte UTF-8 character, nor text a later
    byte token could still change: the deltas joined are the whole output's decode."""

    def __init__(self, tokenizer: Decoder, prompt_ids: list[int] | tuple[int, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._skipped = frozenset(tokenizer.all_special_ids)
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self._run_may_continue(token_id):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def _run_may_continue(self, token_id: int) -> bool:
        """A byte token, or a skipped special that a run of them continues across."""
        token = self._tokenizer.convert_ids_to_tokens(token_id)
        return token_id in self._skipped or bool(_BYTE_TOKEN.fullmatch(token or ""))

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character becomes U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


class StopMatcher:
    """Finds stop strings across deltas; holds back text that may be the start of one."""

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns the text safe to emit and whether a stop string ended the output."""
        buffer = self._pending + text
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            return buffer[: min(hits)], True
        hold = held_suffix(buffer, self._stops)
        self._pending = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text


class OutputStream:
    """One request's output: applies EOS ids, stop strings and max_tokens to each new token."""

    def __init__(
        self, tokenizer: Any, prompt_ids: tuple[int, ...], params: SamplingParams, eos_ids: set[int]
    ):
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = StopMatcher(params.stop)
        self._params = params
        # A constrained output ends at EOS even with ignore_eos or before min_tokens: its grammar allows
        # EOS only once the output is complete, and allows nothing after it.
        self._constrained = params.constraint is not None
        ignores = params.ignore_eos and not self._constrained
        self._eos_ids = (set() if ignores else set(eos_ids)) | set(params.stop_token_ids)
        self.num_tokens = 0
        self.finished = False

    def push(self, token_id: int, logprob: TokenLogprob | None = None) -> Delta:
        self.num_tokens += 1
        delta = Delta(text="", token_ids=[token_id], logprobs=[logprob] if logprob else [])
        if token_id in self._eos_ids and (self.num_tokens > self._params.min_tokens or self._constrained):
            return self._finish(delta, "stop", self._detok.flush())
        text, stopped = self._stops.push(self._detok.push(token_id))
        delta.text = text
        if stopped:
            self.finished = True
            delta.finish_reason = "stop"
        elif self.num_tokens >= self._params.max_tokens:
            return self._finish(delta, "length", self._detok.flush())
        return delta

    def _finish(self, delta: Delta, reason: str, tail: str) -> Delta:
        text, stopped = self._stops.push(tail)
        delta.text += text if stopped else text + self._stops.flush()
        delta.finish_reason = "stop" if stopped else reason  # type: ignore[assignment]
        self.finished = True
        return delta
