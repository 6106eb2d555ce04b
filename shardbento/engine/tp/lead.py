"""Batched text under tensor parallelism: rank 0 runs the Scheduler, the other ranks replay its runner calls."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from shardbento.catalog import ServingLimits
from shardbento.engine.base import Delta, SamplingParams
from shardbento.engine.batch.runner import ModelRunner, PrefillChunk
from shardbento.engine.batch.sampler import RequestSampler
from shardbento.engine.batch.scheduler import Scheduler, Sequence
from shardbento.engine.output import OutputStream
from shardbento.engine.tp.rank import STOP
from shardbento.errors import GenerationFailed, Overloaded, ShardbentoError

logger = logging.getLogger(__name__)

POLL_S = 0.1  # how often an idle rank 0 ships metric observations that no Delta carried
METRIC_NAMES = (
    "ttft",
    "itl",
    "e2e",
    "queue",
    "running",
    "waiting",
    "kv_usage",
    "prompt_tokens",
    "generation_tokens",
)

MetricOp = tuple[str, str, Any]  # (RequestMetrics attribute, method, argument)


@dataclass(frozen=True, slots=True)
class Submit:
    """Service -> rank 0: one text request; `ticket` names it on the way back (request ids may repeat)."""

    ticket: int
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class Cancel:
    """Service -> rank 0: the client went away; the request leaves the batch at the next step."""

    ticket: int


@dataclass(frozen=True, slots=True)
class RankFailure:
    """An exception of rank 0 as plain data: exceptions with keyword fields do not survive pickling."""

    kind: Literal["overloaded", "failed"]
    message: str
    retry_after_s: int = 1

    @classmethod
    def of(cls, exc: BaseException) -> RankFailure:
        if isinstance(exc, Overloaded):
            return cls("overloaded", exc.message, exc.retry_after_s)
        if isinstance(exc, ShardbentoError):
            return cls("failed", exc.message)
        return cls("failed", f"generation failed: {type(exc).__name__}: {exc}")

    def to_exception(self) -> ShardbentoError:
        if self.kind == "overloaded":
            return Overloaded(self.message, retry_after_s=self.retry_after_s)
        return GenerationFailed(self.message)


@dataclass(frozen=True, slots=True)
class StepReport:
    """Rank 0 -> service: one step's (ticket, Delta or failure) items and the metric observations made."""

    items: list[tuple[int, Delta | RankFailure]]
    metrics: list[MetricOp]


class MirrorRunner:
    """Rank 0's runner: each call goes to every follower first, then runs here, so all ranks step together.

    Followers replay the calls in the same order on their own shard; only rank 0 gets logits it uses.
    """

    def __init__(self, runner: ModelRunner, control: tuple[Any, ...]) -> None:
        self._runner = runner
        self._control = control

    @property
    def kv(self) -> Any:
        return self._runner.kv

    def _send(self, method: str, *args: Any) -> None:
        for follower in self._control:
            follower.put((method, args))

    def prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        self._send("prefill", chunks)
        return self._runner.prefill(chunks)

    def decode(self, token_ids: list[int]) -> torch.Tensor:
        self._send("decode", token_ids)
        return self._runner.decode(token_ids)

    def release(self, rows: list[int]) -> None:
        self._send("release", rows)
        self._runner.release(rows)

    def drop(self, seq_id: int) -> None:
        self._send("drop", seq_id)
        self._runner.drop(seq_id)


class _Recorder:
    """One metric of MetricsRelay: records set/inc/observe instead of applying them."""

    __slots__ = ("_name", "_record")

    def __init__(self, name: str, record: Callable[[MetricOp], None]) -> None:
        self._name = name
        self._record = record

    def set(self, value: float) -> None:
        self._record((self._name, "set", value))

    def inc(self, amount: float = 1.0) -> None:
        self._record((self._name, "inc", amount))

    def observe(self, value: float) -> None:
        self._record((self._name, "observe", value))


class MetricsRelay:
    """Rank 0's stand-in for RequestMetrics (same attributes): observations are kept and shipped to
    the service process, which applies them to the real metrics that /metrics serves."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: list[MetricOp] = []
        for name in METRIC_NAMES:
            setattr(self, name, _Recorder(name, self._record))

    def _record(self, op: MetricOp) -> None:
        with self._lock:
            self._ops.append(op)

    def finished(self, reason: str) -> None:
        self._record(("finished", "finished", reason))

    def take(self) -> list[MetricOp]:
        with self._lock:
            ops, self._ops = self._ops, []
        return ops


def apply_metrics(metrics: Any, ops: list[MetricOp]) -> None:
    """Replay rank 0's observations on a RequestMetrics."""
    for name, method, value in ops:
        if name == "finished":
            metrics.finished(value)
        else:
            getattr(getattr(metrics, name), method)(value)


class ReportSender:
    """Rank 0's `deliver`: a step's items and metric observations go to the service as one StepReport.

    Finished and failed requests leave `live` (the tickets a Cancel can still reach).
    """

    def __init__(self, results: Any, relay: MetricsRelay, live: dict[int, Sequence]) -> None:
        self._results = results
        self._relay = relay
        self._live = live
        self._lock = threading.Lock()  # reports leave in the order their observations were made

    def deliver(self, items: list[tuple[int, Delta | BaseException]]) -> list[Any]:
        shipped: list[tuple[int, Delta | RankFailure]] = []
        for ticket, item in items:
            if isinstance(item, BaseException):
                item = RankFailure.of(item)
            if isinstance(item, RankFailure) or item.finish_reason is not None:
                self._live.pop(ticket, None)
            shipped.append((ticket, item))
        with self._lock:
            self._results.put(StepReport(shipped, self._relay.take()))
        return []  # no event loop here; the service process cancels streams whose loop is gone

    def flush_metrics(self) -> None:
        """Observations of steps that delivered nothing (a cancelled batch, gauges going to 0)."""
        with self._lock:
            ops = self._relay.take()
            if ops:
                self._results.put(StepReport([], ops))


def lead(
    runner: ModelRunner, tokenizer: Any, limits: ServingLimits, eos_ids: set[int], channels: Any
) -> None:
    """Rank 0: run the Scheduler over a MirrorRunner until the service sends STOP; then stop followers.

    `channels` has `requests` (Submit, Cancel, STOP in), `results` (StepReports out) and `control`
    (one queue per follower).
    """
    relay = MetricsRelay()
    live: dict[int, Sequence] = {}
    sender = ReportSender(channels.results, relay, live)
    mirror = MirrorRunner(runner, channels.control)
    scheduler = Scheduler(mirror, limits, relay, deliver=sender.deliver, start=False)
    intake = threading.Thread(
        target=_intake,
        args=(scheduler, channels.requests, tokenizer, eos_ids, live, sender),
        name="shardbento-tp-intake",
        daemon=True,
    )
    intake.start()
    try:
        scheduler.run()  # on the thread that loaded the shard: see Scheduler.run
    finally:
        for follower in channels.control:
            follower.put(STOP)


def _intake(
    scheduler: Scheduler,
    requests: Any,
    tokenizer: Any,
    eos_ids: set[int],
    live: dict[int, Sequence],
    sender: ReportSender,
) -> None:
    """Rank 0's request thread: Submit and Cancel into the scheduler until STOP, which closes it."""
    try:
        while True:
            try:
                message = requests.get(timeout=POLL_S)
            except queue.Empty:
                sender.flush_metrics()
                continue
            if isinstance(message, Submit):
                _admit(scheduler, message, tokenizer, eos_ids, live, sender)
            elif isinstance(message, Cancel):
                seq = live.pop(message.ticket, None)
                if seq is not None:
                    seq.cancelled = True
                    scheduler.wake()
            elif message == STOP:
                break
    finally:
        scheduler.close()


def _admit(
    scheduler: Scheduler,
    message: Submit,
    tokenizer: Any,
    eos_ids: set[int],
    live: dict[int, Sequence],
    sender: ReportSender,
) -> None:
    """A Sequence for the request, built where the scheduler decides its finish; a 429 goes straight back."""
    sampler = RequestSampler(message.params, eos_ids=eos_ids, decode=lambda t: tokenizer.decode([t]))
    output = OutputStream(tokenizer, message.prompt_ids, message.params, eos_ids)
    seq = Sequence(message.request_id, list(message.prompt_ids), sampler, output, message.ticket)
    live[message.ticket] = seq  # before submit: the scheduler may finish it before submit returns
    try:
        scheduler.submit(seq)
    except Overloaded as exc:
        sender.deliver([(message.ticket, exc)])


def follow(runner: ModelRunner, control: Any) -> None:
    """A follower rank: replay rank 0's runner calls on this shard, in order, until STOP.

    A call that raises ends the process: the service's watchdog then stops serving, rather than
    leaving the ranks out of step.
    """
    with torch.inference_mode():
        while (message := control.get()) != STOP:
            method, args = message
            getattr(runner, method)(*args)
