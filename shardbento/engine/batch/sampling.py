"""The batch's token selection as tensor ops on the logits' device: per-row parameters as tensors, each
stage one op over the rows it concerns, no host round trip but the one copy of the chosen ids."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
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


# On a CPU a full sort of a 128K vocabulary per row costs more than a small model's forward: for a
# vocabulary wider than CANDIDATE_VOCAB the tokens min_p, top-k and top-p keep are looked for among each
# row's best CANDIDATES first (GPUs sort: it costs them little, and a branch would cost a sync).
CANDIDATES = 512
CANDIDATE_VOCAB = 8 * CANDIDATES
# Rows without top-k that the candidates do not settle are drawn from the whole distribution and the
# draw kept if the nucleus holds it (at least top_p of the time), at most this many times before sorting.
NUCLEUS_DRAWS = 4


def filter_sorted(
    scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, used: Used
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Temperature-scaled logits with what vLLM's order removes at -inf: min_p (on the whole
    distribution), then top-k (per-row k, 0 = all), then top-p of what is left (per-row p; the token that
    crosses it is kept), each only where some row uses it (`used`, known on the host) and only on the rows
    that ask for it. Sorted best first (equal logits by token id) with their token ids when top-k or
    top-p applies; as they are (ids None) otherwise."""
    if used.min_p:
        scaled, _ = min_p_filter(scaled, min_p)
    if not (used.top_k or used.top_p):
        return scaled, None
    ordered, order = scaled.sort(dim=-1, descending=True, stable=True)
    if used.top_k:
        positions = torch.arange(ordered.shape[-1], device=ordered.device)[None, :]
        ordered = ordered.masked_fill((top_k[:, None] > 0) & (positions >= top_k[:, None]), NEG_INF)
    if used.top_p:
        sorted_probs = ordered.softmax(dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability mass ahead of each token
        ordered = ordered.masked_fill((before >= top_p[:, None]) & (top_p[:, None] < 1), NEG_INF)
    return ordered, order


def filter_candidates(
    scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """filter_sorted() over each row's `width` best tokens only: (filtered logits, ids, exact). A row is
    exact when top-k keeps no more than `width` tokens, or when it has no top-k below the vocabulary or
    no top-p and its last candidate is already cut: what the filters keep is then among the candidates,
    with top-p measured against the whole kept mass (a top-k past the candidates would need the mass of
    tokens beyond them)."""
    _, probs = min_p_filter(scaled, min_p)  # 0 where min_p removes a token
    mass = probs.sum(dim=-1)  # what min_p keeps, over the whole row
    values, ids = best(scaled, width)
    p = probs.gather(-1, ids)
    positions = torch.arange(width, device=scaled.device)[None, :]
    keep = (p > 0) & ((top_k[:, None] == 0) | (positions < top_k[:, None]))
    limited = (top_k > 0) & (top_k <= width)
    kept = p * keep
    total = torch.where(limited, kept.sum(dim=-1), mass)  # the mass top-p is a share of
    keep &= ((kept.cumsum(dim=-1) - kept) < top_p[:, None] * total[:, None]) | (top_p[:, None] >= 1)
    measured = (top_k == 0) | (top_k >= scaled.shape[-1]) | (top_p >= 1)  # top-p's total is `mass`
    return values.masked_fill(~keep, NEG_INF), ids, limited | (measured & ~keep[:, -1])


def best(scaled: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's `width` largest logits and their ids, best first and equal logits by token id (the
    sorted vocabulary's order: topk leaves the order of ties to its implementation and to `width`)."""
    values, ids = scaled.topk(width, dim=-1)
    ids, by_id = ids.sort(dim=-1)
    values, order = values.gather(-1, by_id).sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(-1, order)


def min_p_filter(scaled: torch.Tensor, min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the logits with what min_p removes at -inf, the probabilities of what it keeps, 0 elsewhere)."""
    probs = scaled.softmax(dim=-1)
    removed = probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return scaled.masked_fill(removed, NEG_INF), probs.masked_fill_(removed, 0.0)


def in_nucleus(kept: torch.Tensor, picks: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Whether each row's pick lies in top-p's nucleus of `kept` (probabilities, 0 where a filter
    removed the token): the mass ahead of the pick in the sorted order (more likely, or as likely with a
    smaller id) is below `bound` (top_p x the kept mass), as filter_sorted() keeps a token."""
    chance = kept.gather(-1, picks[:, None])
    ids = torch.arange(kept.shape[-1], device=kept.device)[None, :]
    ahead = (kept * ((kept > chance) | ((kept == chance) & (ids < picks[:, None])))).sum(dim=-1)
    return (ahead < bound) & (chance[:, 0] > 0)


def weights_of(filtered: torch.Tensor) -> torch.Tensor:
    """Unnormalised probabilities of filtered logits: exp(logit - the row's best), 0 at -inf (a row
    with nothing left is all 0)."""
    return (filtered - filtered.amax(dim=-1, keepdim=True)).exp_().nan_to_num_(0.0)


def draw(weights: torch.Tensor, ids: torch.Tensor | None, uniforms: torch.Tensor) -> torch.Tensor:
    """The token drawn from each row's `weights` (unnormalised probabilities, 0 where a filter removed
    the token) by inverse transform: the first column whose cumulative weight passes the row's uniform
    (in [0, 1]) times its total. One uniform a row; a column of weight 0 is never chosen (a row of
    zeros takes its first column, a row of NaN its last: it has nothing to draw). The sums are in
    float64: in float32 a long tail of tiny probabilities would vanish into the running total.
    `ids`: the token of each column (None: the columns are the vocabulary)."""
    cumulative = weights.cumsum(dim=-1, dtype=torch.float64)
    total = cumulative[:, -1:]
    below = total.nextafter(torch.full_like(total, NEG_INF))  # u x total may round up to the total
    pick = torch.searchsorted(cumulative, torch.minimum(uniforms[:, None] * total, below), side="right")
    pick.clamp_(max=weights.shape[-1] - 1)  # NaN weights (a softmax of nothing) sort past the end
    return pick[:, 0] if ids is None else ids.gather(-1, pick)[:, 0]


def _taker(picked: list[int], num_rows: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that takes the rows `picked` of a tensor of `num_rows` rows (all of them: the tensor
    itself, no copy)."""
    if picked == list(range(num_rows)):
        return lambda tensor: tensor
    index = torch.tensor(picked, dtype=torch.long, device=device)
    return lambda tensor: tensor[index]


@dataclass(frozen=True, slots=True)
class Used:
    """Which filters any of the sampled rows uses (their parameters are on the host: no device sync)."""

    min_p: bool
    top_k: bool
    top_p: bool


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
        """-inf for each row's EOS ids until min_tokens (an id past the logits' width: nothing to block)."""
        rows = [i for i, s in enumerate(self.samplers) if s.blocks_eos_now]
        blocked = [(i, [e for e in self.samplers[i].eos_ids if e < self.width]) for i in rows]
        blocked = [(i, ids) for i, ids in blocked if ids]
        if blocked:
            width = max(len(ids) for _, ids in blocked)
            padded = [ids + ids[:1] * (width - len(ids)) for _, ids in blocked]
            ids = torch.tensor(padded, dtype=torch.long, device=self.device)
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
        sampled = [i for i, s in enumerate(self.samplers) if not s.params.greedy]
        if len(sampled) == len(self.samplers):  # no greedy row: no argmax to take
            return self._sample(sampled)
        chosen = self.logits.argmax(dim=-1)
        if sampled:
            chosen[self._rows(sampled)] = self._sample(sampled)
        return chosen

    def _sample(self, rows: list[int]) -> torch.Tensor:
        """The sampled rows' draws: temperature, then the filters. On GPUs every row sorts (it costs them
        little, and a branch would cost a sync). On a CPU each row takes the first exact way of: among its
        best candidates (rows with top-k or top-p in a wide vocabulary; in a narrow one, rows with a small
        top-k, among their own k best), drawn from the whole distribution and kept if the nucleus holds
        it (rows without top-k), the sorted vocabulary. Which way a row takes, and how much noise it
        draws, depend on its own parameters and logits alone, so a seeded row draws the same alone and
        inside any batch. Equal logits go by token id, except which of them a candidates' cut keeps
        (topk's choice: the same mass, reproducible)."""
        params = [self.samplers[i].params for i in rows]
        values = torch.tensor(
            [[p.temperature, p.top_k, p.top_p, p.min_p] for p in params],
            dtype=torch.float32,
            device=self.device,
        )
        temperature, top_k, top_p, min_p = values.unbind(dim=1)
        top_k = top_k.long()
        used = Used(
            any(p.min_p > 0 for p in params),
            any(p.top_k > 0 for p in params),
            any(p.top_p < 1 for p in params),
        )
        scaled = _taker(rows, len(self.samplers), self.device)(self.logits) / temperature[:, None]
        if self.device.type != "cpu" or not (used.top_k or used.top_p):
            filtered, ids = filter_sorted(scaled, top_k, top_p, min_p, used)
            return draw(weights_of(filtered), ids, self._uniforms(rows))
        chosen = torch.zeros(len(rows), dtype=torch.long, device=self.device)
        pending = list(range(len(rows)))
        filtering = [j for j in pending if params[j].top_k > 0 or params[j].top_p < 1]
        if self.width > max(CANDIDATE_VOCAB, CANDIDATES):  # a wide vocabulary: the best CANDIDATES first
            groups = {CANDIDATES: filtering} if filtering else {}
        else:  # a narrow one: rows with a small top-k among their own k best (exact), one call per k
            groups = {}
            for j in filtering:
                if 0 < params[j].top_k <= min(CANDIDATES, self.width - 1):
                    groups.setdefault(params[j].top_k, []).append(j)
        for width, among in groups.items():
            index = self._rows(among)
            filtered, ids, exact = filter_candidates(
                scaled[index], top_k[index], top_p[index], min_p[index], width
            )
            chosen[index] = draw(weights_of(filtered), ids, self._uniforms([rows[j] for j in among]))
            settled = {j for j, ok in zip(among, exact.tolist(), strict=True) if ok}
            pending = [j for j in pending if j not in settled]
        drawn = [j for j in pending if params[j].top_k == 0]
        if drawn and NUCLEUS_DRAWS:
            of = _taker(drawn, len(rows), self.device)
            accepted = self._draw_in_nucleus(
                [rows[j] for j in drawn], of(scaled), of(top_p), of(min_p), chosen, drawn
            )
            pending = [j for j in pending if j not in accepted]
        if pending:
            index = self._rows(pending)
            ordered, order = filter_sorted(scaled[index], top_k[index], top_p[index], min_p[index], used)
            chosen[index] = draw(weights_of(ordered), order, self._uniforms([rows[j] for j in pending]))
        return chosen

    def _draw_in_nucleus(
        self,
        rows: list[int],
        scaled: torch.Tensor,
        top_p: torch.Tensor,
        min_p: torch.Tensor,
        chosen: torch.Tensor,
        places: list[int],
    ) -> set[int]:
        """Rows without top-k drawn from what min_p keeps, each draw kept only if top-p's nucleus holds
        it, up to NUCLEUS_DRAWS times (a CPU's way around sorting the vocabulary: a draw is kept with
        probability at least top_p, and a kept draw follows the nucleus' distribution exactly). Writes
        the kept draws into `chosen` at `places`; returns the places drawn (the others still need one)."""
        if bool(min_p.any()):  # on a CPU: no device to wait for
            _, kept = min_p_filter(scaled, min_p)
        else:
            kept = scaled.softmax(dim=-1)
        bound = top_p * kept.sum(dim=-1)
        waiting = list(range(len(rows)))
        for _ in range(NUCLEUS_DRAWS):
            of = _taker(waiting, len(rows), self.device)  # the first round takes every row: no copies
            picks = draw(of(kept), None, self._uniforms([rows[j] for j in waiting]))
            inside = in_nucleus(of(kept), picks, of(bound)) | (of(top_p) >= 1)
            held = inside.tolist()  # on a CPU: no device to wait for
            into = [places[j] for j, ok in zip(waiting, held, strict=True) if ok]
            chosen[torch.tensor(into, dtype=torch.long, device=self.device)] = picks[inside]
            waiting = [j for j, ok in zip(waiting, held, strict=True) if not ok]
            if not waiting:
                break
        missing = set(waiting)
        return {places[j] for j in range(len(rows)) if j not in missing}

    def _uniforms(self, rows: list[int]) -> torch.Tensor:
        """One uniform in [0, 1) (float64) for each of `rows`' draws: a seeded request's from its own
        generator (one a draw, whatever its batch), the others' from the shared one."""
        uniforms = torch.rand(
            len(rows), dtype=torch.float64, device=self.device, generator=shared_generator(self.device)
        )
        for j, i in enumerate(rows):
            generator = self._states[i].generator
            if generator is not None:
                uniforms[j : j + 1] = torch.rand(
                    1, dtype=torch.float64, device=self.device, generator=generator
                )
        return uniforms

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
