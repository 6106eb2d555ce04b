"""Per-request token selection inside generate(): penalties, sampling with the request's own generator."""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import torch

from shardbento.engine.base import SamplingParams, TokenLogprob


def request_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator owned by one request: seeded ones reproduce, others never touch global RNG state."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    return generator


def apply_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside the top-k and outside the smallest set whose probability reaches top_p."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    if penalty == 1.0:
        return logits
    scores = torch.gather(logits, -1, seen_ids)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(-1, seen_ids, scores)


class RequestSampler:
    """A logits processor that picks the next token itself and forces generate() to take it.

    generate() runs greedy; this processor returns scores where only its chosen token is finite,
    so sampling uses the request's own torch.Generator (reproducible per seed, never global state)
    and the chosen token's log-probability is known for `logprobs`.
    """

    def __init__(
        self,
        params: SamplingParams,
        eos_ids: set[int],
        decode: Callable[[int], str],
        device: torch.device | str = "cpu",
    ) -> None:
        self._params = params
        self._eos_ids = sorted(eos_ids)
        self._decode = decode
        self._generator = None if params.greedy else request_generator(params.seed, device)
        self._num_generated = 0
        self._logprobs: deque[TokenLogprob] = deque()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = self._pick(input_ids, scores)
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter(-1, chosen[:, None], 0.0)

    @property
    def needs_history(self) -> bool:
        """Whether select() must see the ids so far (only the repetition penalty reads them)."""
        return self._params.repetition_penalty != 1.0

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with nothing per-row but the EOS block: select_tokens() batches these rows."""
        return self._generator is None and self._params.logprobs is None and not self.needs_history

    def select(self, scores: torch.Tensor, seen_ids: list[int] | None = None) -> int:
        """The next token for one request from its row of a batch's logits ([vocab] or [1, vocab])."""
        scores = scores.reshape(1, -1)
        ids = torch.tensor([seen_ids or []], dtype=torch.long, device=scores.device)
        return int(self._pick(ids, scores)[0])

    def _pick(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float()
        raw_logprobs = logits.log_softmax(dim=-1) if self._params.logprobs is not None else None
        if input_ids.shape[-1]:
            logits = apply_repetition_penalty(logits, input_ids, self._params.repetition_penalty)
        if self.blocks_eos:
            logits = logits.clone()  # float() of float32 logits is the caller's tensor: never write into it
            logits[:, self._eos_ids] = float("-inf")
        chosen = self._choose(logits)
        self._num_generated += 1
        if raw_logprobs is not None:
            self._logprobs.append(self._logprob(raw_logprobs[0], int(chosen[0])))
        return chosen

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        if self._generator is None:
            return logits.argmax(dim=-1)
        scaled = apply_top_k_top_p(logits / self._params.temperature, self._params.top_k, self._params.top_p)
        probs = scaled.softmax(dim=-1)
        if not bool(torch.isfinite(probs).all()):  # overflow or all masked: greedy is the limit
            return logits.argmax(dim=-1)
        if self._generator.device != probs.device:
            probs = probs.to(self._generator.device)
        return torch.multinomial(probs, 1, generator=self._generator).reshape(-1).to(logits.device)

    def _logprob(self, logprobs: torch.Tensor, token_id: int) -> TokenLogprob:
        top: tuple[tuple[str, float], ...] = ()
        if self._params.logprobs:
            values, ids = torch.topk(logprobs, self._params.logprobs)
            top = tuple((self._decode(int(i)), float(v)) for v, i in zip(values, ids, strict=True))
        return TokenLogprob(token=self._decode(token_id), logprob=float(logprobs[token_id]), top=top)

    @property
    def eos_ids(self) -> list[int]:
        return self._eos_ids

    @property
    def blocks_eos(self) -> bool:
        """Whether EOS ids are still masked (min_tokens not reached yet)."""
        return bool(self._eos_ids) and self._num_generated < self._params.min_tokens

    def count_token(self) -> None:
        """Record a token chosen for this request outside _pick (a batched greedy row)."""
        self._num_generated += 1

    def pop_logprob(self) -> TokenLogprob | None:
        return self._logprobs.popleft() if self._logprobs else None


def select_tokens(
    samplers: list[RequestSampler], logits: torch.Tensor, histories: list[list[int] | None]
) -> list[int]:
    """The next token of every row of a batch's logits: plain greedy rows in one argmax, others each
    by its own sampler (its generator, penalties, logprobs). Same tokens as select() row by row."""
    tokens = [0] * len(samplers)
    plain = [i for i, sampler in enumerate(samplers) if sampler.is_plain_greedy]
    if plain:
        rows = logits[plain].float()
        blocked = [j for j, i in enumerate(plain) if samplers[i].blocks_eos]
        if blocked:
            eos = torch.tensor(samplers[plain[blocked[0]]].eos_ids, device=rows.device)
            rows[torch.tensor(blocked, device=rows.device)[:, None], eos[None, :]] = float("-inf")
        for i, token in zip(plain, rows.argmax(dim=-1).tolist(), strict=True):
            samplers[i].count_token()
            tokens[i] = token
    for i, sampler in enumerate(samplers):
        if not sampler.is_plain_greedy:
            tokens[i] = sampler.select(logits[i], histories[i])
    return tokens


def forced_generate_kwargs(
    sampler: RequestSampler, params: SamplingParams, eos_ids: Iterable[int], pad_token_id: int
) -> dict[str, Any]:
    """generate() settings under which `sampler` alone picks every token: greedy, no built-in processors."""
    return {
        "max_new_tokens": params.max_tokens,
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "num_beams": 1,
        "repetition_penalty": None,
        "eos_token_id": None if params.ignore_eos else sorted(eos_ids),
        "pad_token_id": pad_token_id,
        "logits_processor": [sampler],
    }
