"""Token selection: each request's sampling state, and the whole batch's next tokens chosen in a few
tensor ops on the logits' device with one copy of the chosen ids to the host per step."""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

import torch

from shardbento.engine.base import SamplingParams, TokenLogprob
from shardbento.engine.batch.sampling import BatchSampling, request_generator
from shardbento.engine.grammar import Grammars
from shardbento.errors import InvalidRequest


@dataclasses.dataclass(slots=True)
class _DeviceState:
    """A request's tensors on the logits' device, made at its first selection."""

    generator: torch.Generator | None  # seeded requests only
    counts: torch.Tensor | None  # [vocab] generated tokens per id (penalties)
    prompt_seen: torch.Tensor | None  # [vocab] the prompt's ids (repetition penalty)
    bias_ids: torch.Tensor | None
    biases: torch.Tensor | None


class RequestSampler:
    """One request's token selection state: its parameters, EOS ids (blocked until min_tokens), grammar
    matcher, generator, penalty counts and pending logprobs. select_tokens() chooses for many at once;
    as a logits processor it forces generate() to take its choice (the one-at-a-time path)."""

    def __init__(
        self,
        params: SamplingParams,
        eos_ids: set[int],
        decode: Callable[[int], str],
        device: torch.device | str = "cpu",
        grammars: Grammars | None = None,
        prompt_ids: Iterable[int] = (),
    ) -> None:
        self._params = params
        self._eos_ids = sorted(set(eos_ids) | set(params.stop_token_ids))  # blocked until min_tokens
        self._decode = decode
        self._prompt_ids = tuple(prompt_ids) if params.repetition_penalty != 1.0 else ()
        self._device_state: _DeviceState | None = None
        self._num_generated = 0
        self._logprobs: deque[TokenLogprob] = deque()
        self.grammars = grammars
        self.matcher: Any = None  # the constraint's state: advanced with every chosen token
        self.failure: InvalidRequest | None = None  # the constraint left no token the model can produce
        if params.constraint is not None:
            if grammars is None:
                raise ValueError("a constrained request needs the engine's Grammars")
            self.matcher = grammars.matcher(params.constraint)

    @property
    def params(self) -> SamplingParams:
        return self._params

    @property
    def eos_ids(self) -> list[int]:
        return self._eos_ids

    @property
    def penalised(self) -> bool:
        params = self._params
        return params.repetition_penalty != 1.0 or bool(params.presence_penalty or params.frequency_penalty)

    def reseeded(self, seed: int) -> RequestSampler:
        """The same sampler (EOS ids, token names, grammar, prompt) drawing from a generator seeded with `seed`."""
        params = dataclasses.replace(self._params, seed=seed)
        return RequestSampler(
            params, set(self._eos_ids), self._decode, grammars=self.grammars, prompt_ids=self._prompt_ids
        )

    def state(self, device: torch.device, width: int) -> _DeviceState:
        """Its tensors on the logits' device (made once: a request's rows stay on one device)."""
        if self._device_state is None:
            params = self._params
            generator = None
            if not params.greedy and params.seed is not None:
                generator = request_generator(params.seed, device)
            counts = prompt_seen = None
            if self.penalised:
                counts = torch.zeros(width, dtype=torch.float32, device=device)
                prompt_seen = torch.zeros(width, dtype=torch.bool, device=device)
                ids = [i for i in self._prompt_ids if 0 <= i < width]  # never index past the logits
                if ids:
                    prompt_seen[torch.tensor(ids, device=device)] = True
            bias_ids = biases = None
            if params.logit_bias:
                pairs = [(i, b) for i, b in params.logit_bias if i < width]
                bias_ids = torch.tensor([i for i, _ in pairs], dtype=torch.long, device=device)
                biases = torch.tensor([b for _, b in pairs], dtype=torch.float32, device=device)
            self._device_state = _DeviceState(generator, counts, prompt_seen, bias_ids, biases)
        return self._device_state

    @property
    def blocks_eos(self) -> bool:
        """Whether EOS ids are still masked (min_tokens not reached yet)."""
        return bool(self._eos_ids) and self._num_generated < self._params.min_tokens

    @property
    def blocks_eos_now(self) -> bool:
        """The EOS block this step: lifted once the grammar is complete (EOS is then all it allows)."""
        return self.blocks_eos and not (self.matcher is not None and self.matcher.is_accepting())

    def accept(self, token_id: int) -> None:
        """Record the token chosen for this request: counts, grammar state. A token the grammar refuses
        was chosen among none it allows (every id it allows lies past the model's output width, as
        when a tokenizer has more tokens than the model has logits): `failure` says so, for this
        request alone (the other rows of its batch go on)."""
        if self.matcher is not None and not self.matcher.consume_token(token_id):
            constraint = self._params.constraint
            self.failure = InvalidRequest(
                f"{constraint.param}: after {self._num_generated} generated tokens the constraint allows "
                "no token this model can produce (the ids it allows lie past the model's output width)",
                param=constraint.param,
                code="constraint_unsatisfiable",
            )
        self._num_generated += 1

    def push_logprob(self, logprob: TokenLogprob) -> None:
        self._logprobs.append(logprob)

    def pop_logprob(self) -> TokenLogprob | None:
        return self._logprobs.popleft() if self._logprobs else None

    def token_text(self, token_id: int) -> str:
        return self._decode(token_id)

    def select(self, scores: torch.Tensor, allowed: torch.Tensor | None = None) -> int:
        """The next token from one row of logits ([vocab] or [1, vocab])."""
        masks = _done(allowed[None]) if allowed is not None else None
        token = select_tokens([self], scores.reshape(1, -1), masks)[0]
        if self.failure is not None:
            raise self.failure
        return token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """generate()'s logits processor: only this request's choice stays finite."""
        chosen = self.select(scores[-1:])
        forced = torch.full_like(scores, float("-inf"))
        forced[:, chosen] = 0.0
        return forced


def prefetch_masks(samplers: list[RequestSampler]) -> Future[torch.Tensor] | None:
    """The grammar masks select_tokens() will need for these samplers, started now on the grammar
    thread (the scheduler starts them before the decode forward); None when no row is constrained."""
    matchers = [sampler.matcher for sampler in samplers if sampler.matcher is not None]
    if not matchers:
        return None
    grammars = next(sampler.grammars for sampler in samplers if sampler.matcher is not None)
    return grammars.allowed_soon(matchers)


def select_tokens(
    samplers: list[RequestSampler], logits: torch.Tensor, prefetched: Future[torch.Tensor] | None = None
) -> list[int]:
    """The next token of every row of a batch's logits, in vLLM's order: logit bias and the EOS block,
    the grammar masks, the penalties, then greedy rows' argmax and sampled rows' draws (temperature,
    min_p, top-k, top-p), every stage one op over the rows it concerns. The chosen ids reach the host
    in one copy (logprobs in a second, only when a row asks). `prefetched` is prefetch_masks() of these
    samplers or of the first ones (a mixed step's running rows; the joining rows' are made here). The
    masks come first: until the grammar thread is done no matcher may be touched (llguidance refuses a
    matcher used from two threads at once)."""
    masks = _masks(samplers, prefetched)
    selection = BatchSampling(samplers, logits)
    selection.constrain(masks)
    chosen = selection.choose()
    tokens = chosen.tolist()
    selection.record(chosen, tokens)
    return tokens


def _masks(samplers: list[RequestSampler], prefetched: Future[torch.Tensor] | None) -> torch.Tensor | None:
    """The constrained rows' grammar masks, in row order: the prefetched ones and the rest made now."""
    constrained = [sampler for sampler in samplers if sampler.matcher is not None]
    masks = prefetched.result() if prefetched is not None else None
    missing = constrained[0 if masks is None else masks.shape[0] :]
    if missing:  # one mask computation for the rows without one, not one per row
        more = missing[0].grammars.allowed([sampler.matcher for sampler in missing])
        masks = more if masks is None else torch.cat([masks, more])
    return masks


def _done(value: torch.Tensor) -> Future[torch.Tensor]:
    future: Future[torch.Tensor] = Future()
    future.set_result(value)
    return future


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
