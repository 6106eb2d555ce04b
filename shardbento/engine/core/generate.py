"""The one-at-a-time path: models whose decode cannot join the batch run each request through
model.generate(), in the engine process, with the Scheduler's interface and the same Deltas out."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from shardbento.catalog import ServingLimits
from shardbento.engine.base import SamplingParams
from shardbento.engine.batch.sampler import RequestSampler, forced_generate_kwargs
from shardbento.engine.batch.scheduler import FatalEngineError, Outbox
from shardbento.engine.batch.sequence import Sequence, stream_token
from shardbento.errors import InvalidRequest, Overloaded

logger = logging.getLogger(__name__)


class GenerateRunner:
    """A whole generation per call, on every rank: rank 0 streams (its `current` sequence's sampler
    picks the tokens and its output decides when to stop); a follower samples the same tokens from
    the same seed and stops when rank 0 says (a broadcast at each step, inside the generation)."""

    def __init__(self, model: Any, input_device: torch.device, eos_ids: set[int], pad_token_id: int) -> None:
        self.model = model
        self._device = input_device
        self._eos_ids = sorted(eos_ids)
        self._pad_token_id = pad_token_id
        self.current: Sequence | None = None  # rank 0: the sequence being generated
        self.on_token: Callable[[Sequence, int], None] | None = None  # rank 0: each new token
        self.kv = None  # no KV pool: requests run one at a time

    def generate(self, inputs: dict[str, Any], params: SamplingParams) -> None:
        seq = self.current
        ids = inputs["input_ids"][0].tolist() if params.repetition_penalty != 1.0 else ()
        sampler = (
            seq.sampler
            if seq is not None
            else RequestSampler(params, set(self._eos_ids), str, prompt_ids=ids)
        )
        moved = {k: v.to(self._device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        self.model.generate(
            **moved,
            **forced_generate_kwargs(sampler, params, self._eos_ids, self._pad_token_id),
            stopping_criteria=[_Stop(seq, self._device)],
            streamer=_Streamer(seq, self.on_token) if seq is not None else None,
        )


class _Streamer:
    """generate()'s streamer on rank 0: every new token to the loop (the prompt comes first: skipped)."""

    def __init__(self, seq: Sequence, on_token: Callable[[Sequence, int], None]) -> None:
        self._seq = seq
        self._on_token = on_token
        self._saw_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._saw_prompt:
            self._saw_prompt = True
            return
        if not self._seq.output.finished:
            self._on_token(self._seq, int(value.reshape(-1)[0]))

    def end(self) -> None:
        pass


class _Stop:
    """Stops generate() on every rank at the same step: rank 0 decides (its output finished, or the
    client went away) and, with other ranks, broadcasts the decision (each step is a collective)."""

    def __init__(self, seq: Sequence | None, device: torch.device) -> None:
        self._seq = seq
        self._device = device

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        import torch.distributed as dist

        done = self._seq is not None and (self._seq.output.finished or self._seq.cancelled)
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([int(done)], device=input_ids.device)
            dist.broadcast(flag, src=0)
            done = bool(flag.item())
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class GenerateLoop:
    """Requests in arrival order, one generate() at a time (the runner's calls mirrored to any
    followers). Same interface as the Scheduler: submit, wake, close, run, is_alive."""

    def __init__(
        self,
        runner: Any,
        local: GenerateRunner,
        limits: ServingLimits,
        metrics: Any,
        deliver: Callable[[Outbox], list[Any]],
    ) -> None:
        self._runner = runner  # the MirrorRunner: its generate() reaches every rank
        self._local = local
        self._limits = limits
        self._metrics = metrics
        self._deliver = deliver
        self._waiting: deque[Sequence] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._stopped = threading.Event()
        local.on_token = self._token

    def submit(self, *seqs: Sequence) -> None:
        if any(seq.scoring is not None for seq in seqs):
            raise InvalidRequest(
                "prompt logprobs are not available for this model: it runs one request at a time through "
                "generate(), which keeps no prompt logits",
                param="prompt_logprobs",
            )
        with self._wake:
            if len(self._waiting) + len(seqs) > self._limits.max_waiting + 1:
                raise Overloaded(
                    f"server is at capacity (1 running, {self._limits.max_waiting} waiting); retry later",
                    retry_after_s=1,
                )
            self._waiting.extend(seqs)
            self._metrics.waiting.set(len(self._waiting))
            self._wake.notify()

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()

    @property
    def is_alive(self) -> bool:
        return not self._stopped.is_set()

    def run(self) -> None:
        try:
            while (seq := self._next()) is not None:
                self._serve(seq)
        finally:
            self._stopped.set()

    def _next(self) -> Sequence | None:
        with self._wake:
            while not self._closed and not self._waiting:
                self._wake.wait()
            if self._closed:
                return None
            seq = self._waiting.popleft()
            self._metrics.waiting.set(len(self._waiting))
            return seq

    def _serve(self, seq: Sequence) -> None:
        if seq.cancelled:
            self._metrics.finished("abort")
            return
        if not seq.sampler.params.greedy and seq.sampler.params.seed is None:
            seq.sampler = seq.sampler.reseeded(secrets.randbits(63))  # every rank samples the same tokens
        params = seq.sampler.params
        self._metrics.queue.observe(time.monotonic() - seq.arrival_s)
        self._metrics.prompt_tokens.inc(len(seq.prompt_ids))
        self._metrics.running.set(1)
        self._local.current = seq
        try:
            self._runner.generate(seq.inputs or _ids(seq), params)
            if not seq.output.finished:  # generate() stopped on its own (cancelled): close the stream
                seq.output.finished = True
                self._metrics.finished("abort")
        except FatalEngineError as exc:
            self._deliver([(seq.channel, exc)])
            raise
        except Exception as exc:  # noqa: BLE001 - the request fails, the engine keeps serving
            logger.exception("request %s: generation failed", seq.request_id)
            self._metrics.finished("error")
            self._deliver([(seq.channel, exc)])
        finally:
            self._local.current = None
            self._metrics.running.set(0)

    def _token(self, seq: Sequence, token: int) -> None:
        self._deliver([(seq.channel, stream_token(seq, token, self._metrics))])


def _ids(seq: Sequence) -> dict[str, Any]:
    ids = torch.tensor([seq.prompt_ids], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
