"""Per-request token selection: logit bias, penalties, sampling with the request's own generator, logprobs."""

from __future__ import annotations

import dataclasses
import secrets
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

import torch

from shardbento.engine.base import SamplingParams, TokenLogprob
from shardbento.engine.grammar import Grammars, mask_disallowed


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


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Mask tokens less likely than min_p times the most likely one (on temperature-scaled logits)."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))


def apply_output_penalties(
    logits: torch.Tensor, counts: dict[int, int], presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's presence and frequency penalties over the tokens this request has generated so far."""
    if not counts or not (presence or frequency):
        return logits
    ids = torch.tensor(list(counts), dtype=torch.long, device=logits.device)
    times = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
    penalty = -(frequency * times + presence)
    return logits.index_add(-1, ids, penalty.expand(*logits.shape[:-1], -1))


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
        grammars: Grammars | None = None,
    ) -> None:
        self._params = params
        self._device = device
        self._eos_ids = sorted(set(eos_ids) | set(params.stop_token_ids))  # blocked until min_tokens
        self._decode = decode
        self._generator = None if params.greedy else request_generator(params.seed, device)
        self._num_generated = 0
        self._counts: dict[int, int] = {}  # generated token -> times, for presence/frequency penalties
        self._logprobs: deque[TokenLogprob] = deque()
        self.grammars = grammars
        unshaped = not dataclasses.replace(params, constraint=None).shapes_logits
        self._plain_greedy = self._generator is None and params.logprobs is None and unshaped
        self.matcher: Any = None  # the constraint's state: advanced with every chosen token
        if params.constraint is not None:
            if grammars is None:
                raise ValueError("a constrained request needs the engine's Grammars")
            self.matcher = grammars.matcher(params.constraint)

    @property
    def params(self) -> SamplingParams:
        return self._params

    def reseeded(self, seed: int) -> RequestSampler:
        """The same sampler (EOS ids, token names, grammar) drawing from a generator seeded with `seed`."""
        params = dataclasses.replace(self._params, seed=seed)
        return RequestSampler(params, set(self._eos_ids), self._decode, self._device, self.grammars)

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
        """Greedy with nothing per-row but the EOS block and a grammar mask: select_tokens() batches
        these rows (one masked argmax for all of them)."""
        return self._plain_greedy

    @property
    def blocks_eos_now(self) -> bool:
        """The EOS block this step: lifted once the grammar is complete (EOS is then all it allows)."""
        return self.blocks_eos and not (self.matcher is not None and self.matcher.is_accepting())

    def advance_grammar(self, token_id: int) -> None:
        if self.matcher is not None and not self.matcher.consume_token(token_id):
            raise RuntimeError(f"the grammar refused its own token: {self.matcher.get_error()}")

    def select(
        self, scores: torch.Tensor, seen_ids: list[int] | None = None, allowed: torch.Tensor | None = None
    ) -> int:
        """The next token for one request from its row of a batch's logits ([vocab] or [1, vocab]);
        `allowed` is this step's grammar mask when the caller computed it for the batch."""
        scores = scores.reshape(1, -1)
        ids = torch.tensor([seen_ids or []], dtype=torch.long, device=scores.device)
        return int(self._pick(ids, scores, allowed)[0])

    def _pick(
        self, input_ids: torch.Tensor, scores: torch.Tensor, allowed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """vLLM's order: logit bias and the EOS block, then the penalties, then temperature and the rest."""
        params = self._params
        logits = scores.float()
        raw_logprobs = logits.log_softmax(dim=-1) if params.logprobs is not None else None
        blocks_eos = self.blocks_eos_now
        if params.logit_bias or blocks_eos or self.matcher is not None:
            logits = logits.clone()  # float() of float32 logits is the caller's tensor: never write into it
            for token_id, bias in params.logit_bias:
                logits[:, token_id] += bias
            if blocks_eos:
                logits[:, self._eos_ids] = float("-inf")
            if self.matcher is not None:
                if allowed is None:
                    allowed = self.grammars.allowed([self.matcher])[0]
                mask_disallowed(logits, allowed[None])
        if input_ids.shape[-1]:
            logits = apply_repetition_penalty(logits, input_ids, params.repetition_penalty)
        logits = apply_output_penalties(
            logits, self._counts, params.presence_penalty, params.frequency_penalty
        )
        chosen = self._choose(logits)
        self.count_token(int(chosen[0]))
        self.advance_grammar(int(chosen[0]))
        if raw_logprobs is not None:
            self._logprobs.append(self._logprob(raw_logprobs[0], int(chosen[0])))
        return chosen

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        if self._generator is None:
            return logits.argmax(dim=-1)
        scaled = apply_min_p(logits / self._params.temperature, self._params.min_p)
        scaled = apply_top_k_top_p(scaled, self._params.top_k, self._params.top_p)
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

    def count_token(self, token_id: int) -> None:
        """Record a token chosen for this request (by _pick, or outside it for a batched greedy row)."""
        self._num_generated += 1
        self._counts[token_id] = self._counts.get(token_id, 0) + 1

    def pop_logprob(self) -> TokenLogprob | None:
        return self._logprobs.popleft() if self._logprobs else None


def prefetch_masks(samplers: list[RequestSampler]) -> Future[torch.Tensor] | None:
    """The grammar masks select_tokens() will need for these samplers, started now on the grammar
    thread (the scheduler starts them before the decode forward); None when no row is constrained."""
    matchers = [sampler.matcher for sampler in samplers if sampler.matcher is not None]
    if not matchers:
        return None
    grammars = next(sampler.grammars for sampler in samplers if sampler.matcher is not None)
    return grammars.allowed_soon(matchers)


def select_tokens(
    samplers: list[RequestSampler],
    logits: torch.Tensor,
    histories: list[list[int] | None],
    prefetched: Future[torch.Tensor] | None = None,
) -> list[int]:
    """The next token of every row of a batch's logits: plain greedy rows (constrained or not) in one
    masked argmax, others each by its own sampler (its generator, penalties, logprobs). Same tokens as
    select() row by row. `prefetched` is prefetch_masks() of these samplers, or of the first ones (a
    mixed step's running rows, before the rows that joined in it: theirs are computed here)."""
    tokens = [0] * len(samplers)
    constrained = [i for i, sampler in enumerate(samplers) if sampler.matcher is not None]
    masks = prefetched.result() if prefetched is not None else None
    missing = constrained[0 if masks is None else masks.shape[0] :]
    if missing:  # one mask computation for the rows without one, not one per row
        more = samplers[missing[0]].grammars.allowed([samplers[i].matcher for i in missing])
        masks = more if masks is None else torch.cat([masks, more])
    plain = [i for i, sampler in enumerate(samplers) if sampler.is_plain_greedy]
    if plain:
        rows = logits[plain].float()
        blocked = [j for j, i in enumerate(plain) if samplers[i].blocks_eos_now]
        if blocked:
            eos = torch.tensor(samplers[plain[blocked[0]]].eos_ids, device=rows.device)
            rows[torch.tensor(blocked, device=rows.device)[:, None], eos[None, :]] = float("-inf")
        if masks is not None:
            _mask_rows(rows, plain, constrained, masks)
        for i, token in zip(plain, rows.argmax(dim=-1).tolist(), strict=True):
            samplers[i].count_token(token)
            samplers[i].advance_grammar(token)
            tokens[i] = token
    if len(plain) < len(samplers):
        mask_of = {i: masks[row] for row, i in enumerate(constrained)} if masks is not None else {}
        for i, sampler in enumerate(samplers):
            if not sampler.is_plain_greedy:
                tokens[i] = sampler.select(logits[i], histories[i], mask_of.get(i))
    return tokens


def _mask_rows(rows: torch.Tensor, plain: list[int], constrained: list[int], masks: torch.Tensor) -> None:
    """The grammar masks on the plain rows that have one, in one masked_fill."""
    if plain == constrained:  # every plain row constrained, in the same order: no gather or scatter
        mask_disallowed(rows, masks)
        return
    at = {i: row for row, i in enumerate(constrained)}
    pairs = [(j, at[i]) for j, i in enumerate(plain) if i in at]
    if not pairs:
        return
    targets = torch.tensor([j for j, _ in pairs], device=rows.device)
    picked = rows[targets]
    mask_disallowed(picked, masks[torch.tensor([k for _, k in pairs])])
    rows[targets] = picked


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
