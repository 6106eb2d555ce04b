"""Continuous batching: one engine thread steps every running sequence together, newcomers join per step."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from shardbento.catalog import ServingLimits
from shardbento.engine.base import Delta
from shardbento.engine.kvslots import SlotKVCache
from shardbento.engine.sampler import RequestSampler
from shardbento.errors import Overloaded
from shardbento.metrics import RequestMetrics
from shardbento.textstream import OutputStream

logger = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)  # identity: the queues remove this very request
class Sequence:
    """One request inside the scheduler; `cancelled` is set from the event loop, read by the thread."""

    request_id: str
    prompt_ids: list[int]
    sampler: RequestSampler
    output: OutputStream
    emit: Callable[[Delta | BaseException], None]
    arrival_s: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    history: list[int] = field(default_factory=list)
    prefill_cache: Any = None
    num_prefilled: int = 0
    next_token: int = -1
    last_token_s: float = 0.0


class Scheduler:
    """Iteration-level batching over a SlotKVCache, in the style of vLLM's scheduler.

    Each step first prefills waiting requests (FIFO, at most `max_prefill_tokens` prompt tokens, a
    long prompt spread over several steps so running streams never stall long), then decodes one
    token for every running sequence in one forward pass. Finished and cancelled sequences leave at
    the end of the step that sees them. One thread owns the model: forward passes never overlap.
    """

    def __init__(
        self, model: Any, limits: ServingLimits, max_model_len: int, metrics: RequestMetrics
    ) -> None:
        self._model = model
        self._limits = limits
        self._metrics = metrics
        self._kv = SlotKVCache(limits.max_num_seqs, max_model_len)
        self._device = model.get_input_embeddings().weight.device
        self._additive_mask = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="shardbento-scheduler", daemon=True)
        self._thread.start()

    def submit(self, seq: Sequence) -> None:
        """Queue a request; past the waiting bound it is refused with a 429."""
        with self._wake:
            if len(self._waiting) >= self._limits.max_waiting + self._free_slots():
                raise Overloaded(
                    f"server is at capacity ({self._limits.max_num_seqs} running, "
                    f"{self._limits.max_waiting} waiting); retry later",
                    retry_after_s=1,
                )
            self._waiting.append(seq)
            self._metrics.waiting.set(len(self._waiting))
            self._wake.notify()

    def _free_slots(self) -> int:
        return self._limits.max_num_seqs - len(self._running)

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop after the current step; requests still queued get no more tokens."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._running:
                    self._wake.wait()
                if self._closed:
                    return
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
                logger.exception("engine step failed; failing %d requests", len(self._running))
                self._fail_all(exc)

    def _step(self) -> None:
        self._drop_cancelled()
        self._prefill()
        if self._running:
            self._decode()
        self._metrics.running.set(len(self._running))
        self._metrics.waiting.set(len(self._waiting))
        self._metrics.kv_usage.set(self._kv.usage())

    def _drop_cancelled(self) -> None:
        with self._wake:
            for seq in [s for s in self._waiting if s.cancelled]:
                self._waiting.remove(seq)
                self._metrics.finished("abort")
        gone = [i for i, seq in enumerate(self._running) if seq.cancelled]
        for _ in gone:
            self._metrics.finished("abort")
        self._release(gone)

    def _prefill(self) -> None:
        budget = self._limits.max_prefill_tokens
        while budget > 0 and self._waiting and self._free_slots() > 0:
            seq = self._waiting[0]
            if seq.prefill_cache is None:
                self._metrics.queue.observe(time.monotonic() - seq.arrival_s)
            chunk = seq.prompt_ids[seq.num_prefilled : seq.num_prefilled + budget]
            logits = self._prefill_chunk(seq, chunk)
            budget -= len(chunk)
            if seq.num_prefilled < len(seq.prompt_ids):
                return  # the rest of this prompt goes in the next step
            with self._wake:
                self._waiting.popleft()
            self._metrics.prompt_tokens.inc(len(seq.prompt_ids))
            if self._accept(seq, logits[0]):
                continue
            self._kv.load(len(self._running), seq.prefill_cache)
            seq.prefill_cache = None
            self._running.append(seq)

    def _prefill_chunk(self, seq: Sequence, chunk: list[int]) -> torch.Tensor:
        from transformers import DynamicCache

        if seq.prefill_cache is None:
            seq.prefill_cache = DynamicCache(config=self._model.config)
        start = seq.num_prefilled
        ids = torch.tensor([chunk], dtype=torch.long, device=self._device)
        positions = torch.arange(start, start + len(chunk), device=self._device)[None]
        out = self._model(
            input_ids=ids,
            position_ids=positions,
            past_key_values=seq.prefill_cache,
            use_cache=True,
            logits_to_keep=1,
        )
        seq.num_prefilled += len(chunk)
        return out.logits[:, -1]

    def _decode(self) -> None:
        num_rows = len(self._running)
        lengths = self._kv.lengths[:num_rows]
        kv_len = max(lengths) + 1
        self._kv.begin_step(num_rows, kv_len, self._device)
        starts = torch.tensor(lengths, device=self._device)
        mask = torch.arange(kv_len, device=self._device)[None, :] <= starts[:, None]
        if self._additive_mask:
            dtype = self._model.dtype
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
        ids = torch.tensor([[seq.next_token] for seq in self._running], device=self._device)
        out = self._model(
            input_ids=ids,
            position_ids=starts[:, None],
            attention_mask=mask[:, None, None, :],
            past_key_values=self._kv,
            use_cache=True,
            logits_to_keep=1,
        )
        self._kv.advance(num_rows)
        logits = out.logits[:, -1]
        done = [i for i, seq in enumerate(self._running) if self._accept(seq, logits[i])]
        self._release(done)

    def _accept(self, seq: Sequence, logits: torch.Tensor) -> bool:
        """Pick and stream the sequence's next token; True when the sequence is finished."""
        history = seq.history if seq.sampler.needs_history else None
        if history is not None and not history:
            history.extend(seq.prompt_ids)
        token = seq.sampler.select(logits, history)
        if history is not None:
            history.append(token)
        now = time.monotonic()
        self._metrics.generation_tokens.inc()
        if seq.last_token_s:
            self._metrics.itl.observe(now - seq.last_token_s)
        else:
            self._metrics.ttft.observe(now - seq.arrival_s)
        seq.last_token_s = now
        delta = seq.output.push(token, seq.sampler.pop_logprob())
        _send(seq, delta)
        seq.next_token = token
        if delta.finish_reason is None:
            return False
        self._metrics.e2e.observe(now - seq.arrival_s)
        self._metrics.finished(delta.finish_reason)
        return True

    def _release(self, rows: list[int]) -> None:
        """Remove rows from the batch, keeping the rest in slots 0..n-1 (the last row fills each gap)."""
        for row in sorted(rows, reverse=True):
            last = len(self._running) - 1
            if row != last:
                self._kv.move(last, row)
                self._running[row] = self._running[last]
            else:
                self._kv.free(row)
            self._running.pop()

    def _fail_all(self, exc: BaseException) -> None:
        with self._wake:
            failed = [*self._running, *(s for s in self._waiting if s.prefill_cache is not None)]
            for seq in failed:
                if seq in self._waiting:
                    self._waiting.remove(seq)
        self._release(list(range(len(self._running))))
        for seq in failed:
            self._metrics.finished("error")
            _send(seq, exc)


def _send(seq: Sequence, item: Delta | BaseException) -> None:
    """Hand an item to the request's event loop; a loop that is gone cancels the sequence."""
    try:
        seq.emit(item)
    except RuntimeError:  # the client's event loop closed (its process is shutting down)
        seq.cancelled = True
