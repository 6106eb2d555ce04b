"""The batch's token selection as tensor ops on the logits' device: per-row parameters as tensors, each
stage one op over the rows it concerns, no host round trip but the one copy of the chosen ids."""

from __future__ import annotations

import secrets
from typing import Any

import torch

from shardbento.engine.base import TokenLogprob
from shardbento.engine.grammar import mask_disallowed

NEG_INF = float("-inf")

_SHARED: dict[torch.device, torch.Generator] = {}  # the draws of requests without a seed, per device


def request_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator owned by one request: seeded ones reproduce, others never touch global RNG state."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    return generator


def shared_generator(device: torch.device) -> torch.Generator:
    """The generator unseeded requests draw from on `device` (randomly seeded once per process)."""
    if device not in _SHARED:
        _SHARED[device] = request_generator(None, device)
    return _SHARED[device]


def add_biases(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, biases: torch.Tensor) -> None:
    """In place: every (row, token) pair's bias added to the raw logits in one indexed add."""
    logits.index_put_((rows, ids), biases.to(logits.dtype), accumulate=True)


def block_tokens(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> None:
    """In place: -inf at `ids` ([len(rows), k], rows padded with a repeat of one of their own ids) of
    each of `rows` (the EOS ids of rows still short of min_tokens)."""
    logits[rows[:, None], ids] = NEG_INF


def apply_penalties(
    logits: torch.Tensor,
    rows: torch.Tensor,
    counts: torch.Tensor,
    prompt_seen: torch.Tensor,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> None:
    """In place, on `rows`: transformers' and vLLM's repetition penalty over the tokens of the prompt
    and the output so far (logits of seen tokens divided by it when positive, multiplied when
    negative), then OpenAI's presence and frequency penalties over the output (counts [rows, vocab])."""
    picked = logits[rows]
    seen = prompt_seen | (counts > 0)
    penalty = repetition[:, None]
    penalised = torch.where(picked < 0, picked * penalty, picked / penalty)
    picked = torch.where(seen, penalised, picked)
    picked = picked - frequency[:, None] * counts - presence[:, None] * (counts > 0)
    logits[rows] = picked


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """One token per row from temperature-scaled logits, in vLLM's order: min_p, then top-k and top-p
    (per-row k, 0 = all, and p); a draw by the exponential race (argmax of probs / noise, noise ~ Exp(1):
    the same distribution as multinomial, from noise drawn before, so each row can use its own
    generator). A row left with nothing to choose from takes its argmax."""
    scaled = logits / temperature[:, None]
    probs = scaled.softmax(dim=-1)
    scaled = scaled.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, NEG_INF)
    ordered, order = scaled.sort(dim=-1, descending=True)
    positions = torch.arange(ordered.shape[-1], device=ordered.device)[None, :]
    beyond_k = (top_k[:, None] > 0) & (positions >= top_k[:, None])
    ordered = ordered.masked_fill(beyond_k, NEG_INF)
    sorted_probs = ordered.softmax(dim=-1)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability mass ahead of each token
    ordered = ordered.masked_fill(before >= top_p[:, None], NEG_INF)  # keep the token that crosses top_p
    kept = torch.full_like(scaled, NEG_INF).scatter(-1, order, ordered)
    chosen = (kept.softmax(dim=-1) / noise).argmax(dim=-1)
    nothing = torch.isinf(kept).all(dim=-1) | torch.isnan(kept).any(dim=-1)
    return torch.where(nothing, logits.argmax(dim=-1), chosen)


class BatchSampling:
    """One step's selection for `samplers` (RequestSampler, one per row of `logits`): construct,
    constrain (grammar masks), choose, then record the chosen ids back into each request's state."""

    def __init__(self, samplers: list[Any], logits: torch.Tensor) -> None:
        self.samplers = samplers
        self.logits = logits.to(torch.float32, copy=True)  # the caller's logits stay as they were
        self.device, self.width = logits.device, logits.shape[-1]
        self._states = [s.state(self.device, self.width) for s in samplers]
        self._logprob_rows = [i for i, s in enumerate(samplers) if s.params.logprobs is not None]
        self._raw = None
        if self._logprob_rows:  # logprobs are the model's, before any processing
            self._raw = self.logits[self._rows(self._logprob_rows)].log_softmax(dim=-1)
        self._add_biases()
        self._block_eos()

    def _rows(self, rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _add_biases(self) -> None:
        biased = [(i, st) for i, st in enumerate(self._states) if st.bias_ids is not None]
        if biased:
            rows = torch.cat([torch.full_like(st.bias_ids, i) for i, st in biased])
            ids = torch.cat([st.bias_ids for _, st in biased])
            add_biases(self.logits, rows, ids, torch.cat([st.biases for _, st in biased]))

    def _block_eos(self) -> None:
        blocked = [(i, s.eos_ids) for i, s in enumerate(self.samplers) if s.blocks_eos_now]
        if blocked:
            width = max(len(ids) for _, ids in blocked)
            padded = [ids + ids[:1] * (width - len(ids)) for _, ids in blocked]
            ids = torch.tensor(padded, dtype=torch.long, device=self.device).clamp_(max=self.width - 1)
            block_tokens(self.logits, self._rows([i for i, _ in blocked]), ids)

    def constrain(self, masks: torch.Tensor | None) -> None:
        """The grammar masks of the constrained rows (in row order) on their logits."""
        rows = [i for i, s in enumerate(self.samplers) if s.matcher is not None]
        if masks is None or not rows:
            return
        if rows == list(range(len(self.samplers))):
            mask_disallowed(self.logits, masks)
            return
        index = self._rows(rows)
        picked = self.logits[index]
        mask_disallowed(picked, masks)
        self.logits[index] = picked

    def choose(self) -> torch.Tensor:
        """The chosen id of every row, on the device: penalties, then greedy rows' argmax and sampled
        rows' draws."""
        penalised = [i for i, s in enumerate(self.samplers) if s.penalised]
        if penalised:
            params = [self.samplers[i].params for i in penalised]
            values = torch.tensor(
                [[p.repetition_penalty, p.presence_penalty, p.frequency_penalty] for p in params],
                dtype=torch.float32,
                device=self.device,
            )
            apply_penalties(
                self.logits,
                self._rows(penalised),
                torch.stack([self._states[i].counts for i in penalised]),
                torch.stack([self._states[i].prompt_seen for i in penalised]),
                *values.unbind(dim=1),
            )
        chosen = self.logits.argmax(dim=-1)
        sampled = [i for i, s in enumerate(self.samplers) if not s.params.greedy]
        if sampled:
            chosen[self._rows(sampled)] = self._sample(sampled)
        return chosen

    def _sample(self, rows: list[int]) -> torch.Tensor:
        params = [self.samplers[i].params for i in rows]
        values = torch.tensor(
            [[p.temperature, p.top_k, p.top_p, p.min_p] for p in params],
            dtype=torch.float32,
            device=self.device,
        )
        temperature, top_k, top_p, min_p = values.unbind(dim=1)
        noise = torch.empty((len(rows), self.width), device=self.device)
        noise.exponential_(generator=shared_generator(self.device))
        for j, i in enumerate(rows):  # a seeded request draws from its own generator, whatever its batch
            generator = self._states[i].generator
            if generator is not None:
                noise[j].exponential_(generator=generator)
        return sample(self.logits[self._rows(rows)], temperature, top_k.long(), top_p, min_p, noise)

    def record(self, chosen: torch.Tensor, tokens: list[int]) -> None:
        """Each request's state after the step: the grammar advanced, penalty counts (on the device),
        logprobs (a second copy to the host, only when a row asks)."""
        one = torch.ones(1, device=self.device)
        for i, (sampler, token) in enumerate(zip(self.samplers, tokens, strict=True)):
            sampler.accept(token)
            counts = self._states[i].counts
            if counts is not None:
                counts.index_put_((chosen[i : i + 1],), one, accumulate=True)
        if self._raw is not None:
            self._record_logprobs(chosen, tokens)

    def _record_logprobs(self, chosen: torch.Tensor, tokens: list[int]) -> None:
        rows = self._logprob_rows
        top = max(self.samplers[i].params.logprobs for i in rows) or 1
        picked = self._raw.gather(1, chosen[self._rows(rows)][:, None])[:, 0]
        values, ids = self._raw.topk(min(top, self.width), dim=-1)
        picked, values, ids = picked.tolist(), values.tolist(), ids.tolist()
        for j, i in enumerate(rows):
            sampler = self.samplers[i]
            k = sampler.params.logprobs
            top_k = zip(ids[j][:k], values[j][:k], strict=True)
            alternatives = tuple((sampler.token_text(t), v) for t, v in top_k)
            sampler.push_logprob(TokenLogprob(sampler.token_text(tokens[i]), picked[j], alternatives))
