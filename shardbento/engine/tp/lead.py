"""Batched text under tensor parallelism: rank 0 runs the Scheduler, the other ranks replay its runner calls."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import torch

from shardbento.catalog import ServingLimits
from shardbento.engine.base import Delta
from shardbento.engine.batch.runner import ModelRunner, PrefillChunk
from shardbento.engine.batch.sampler import RequestSampler
from shardbento.engine.batch.scheduler import Scheduler, Sequence
from shardbento.engine.grammar import Grammars
from shardbento.engine.output import OutputStream
from shardbento.engine.tp.messages import (
    Cancel,
    RankFailure,
    RunnerCall,
    StepReport,
    Stop,
    Submit,
    SubmitChoices,
)
from shardbento.engine.tp.relay import MetricsRelay
from shardbento.errors import Overloaded, ShardbentoError

logger = logging.getLogger(__name__)

POLL_S = 0.1  # how often an idle rank 0 ships metric observations that no Delta carried


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

    @property
    def packs(self) -> bool:
        return self._runner.packs  # every rank agreed on it (and on mixes) when the pools were allocated

    @property
    def mixes(self) -> bool:
        return self._runner.mixes

    def mixed(self, chunks: list[PrefillChunk], token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        self._send(RunnerCall("mixed", (chunks, token_ids)))
        return self._runner.mixed(chunks, token_ids)

    def _send(self, call: RunnerCall) -> None:
        for follower in self._control:
            follower.put(call)

    def prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        self._send(RunnerCall("prefill", (chunks,)))
        return self._runner.prefill(chunks)

    def decode(self, token_ids: list[int]) -> torch.Tensor:
        self._send(RunnerCall("decode", (token_ids,)))
        return self._runner.decode(token_ids)

    def release(self, rows: list[int]) -> None:
        self._send(RunnerCall("release", (rows,)))
        self._runner.release(rows)

    def drop(self, seq_id: int) -> None:
        self._send(RunnerCall("drop", (seq_id,)))
        self._runner.drop(seq_id)

    def store_prefix(self, blocks: list[tuple[int, int, int]]) -> None:
        self._send(RunnerCall("store_prefix", (blocks,)))
        self._runner.store_prefix(blocks)

    def drop_prefix(self, moves: list[tuple[int, int]], count: int) -> None:
        self._send(RunnerCall("drop_prefix", (moves, count)))
        self._runner.drop_prefix(moves, count)


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
    runner: ModelRunner,
    tokenizer: Any,
    limits: ServingLimits,
    eos_ids: set[int],
    grammars: Grammars,
    channels: Any,
) -> None:
    """Rank 0: run the Scheduler over a MirrorRunner until the service sends Stop; then stop followers.

    `channels` has `requests` (Submit, Cancel, Stop in), `results` (StepReports out) and `control`
    (one queue per follower).
    """
    relay = MetricsRelay()
    live: dict[int, Sequence] = {}
    sender = ReportSender(channels.results, relay, live)
    mirror = MirrorRunner(runner, channels.control)
    scheduler = Scheduler(mirror, limits, relay, deliver=sender.deliver, start=False)
    intake = threading.Thread(
        target=_intake,
        args=(scheduler, channels.requests, tokenizer, eos_ids, grammars, live, sender),
        name="shardbento-tp-intake",
        daemon=True,
    )
    intake.start()
    try:
        scheduler.run()  # on the thread that loaded the shard: see Scheduler.run
    finally:
        for follower in channels.control:
            follower.put(Stop())


def _intake(
    scheduler: Scheduler,
    requests: Any,
    tokenizer: Any,
    eos_ids: set[int],
    grammars: Grammars,
    live: dict[int, Sequence],
    sender: ReportSender,
) -> None:
    """Rank 0's request thread: Submit and Cancel into the scheduler until Stop, which closes it."""
    try:
        while True:
            try:
                message = requests.get(timeout=POLL_S)
            except queue.Empty:
                sender.flush_metrics()
                continue
            if isinstance(message, Submit | SubmitChoices):
                choices = message.choices if isinstance(message, SubmitChoices) else (message,)
                _admit(scheduler, choices, tokenizer, eos_ids, grammars, live, sender)
            elif isinstance(message, Cancel):
                seq = live.pop(message.ticket, None)
                if seq is not None:
                    seq.cancelled = True
                    scheduler.wake()
            elif isinstance(message, Stop):
                break
    finally:
        scheduler.close()


def _admit(
    scheduler: Scheduler,
    choices: tuple[Submit, ...],
    tokenizer: Any,
    eos_ids: set[int],
    grammars: Grammars,
    live: dict[int, Sequence],
    sender: ReportSender,
) -> None:
    """Sequences for the request's choices, built where the scheduler decides their finish (rank 0
    samples, grammar state included) and queued together; a 429 or a grammar refusal goes straight
    back to every choice."""
    try:
        seqs = [_sequence(message, tokenizer, eos_ids, grammars) for message in choices]
    except ShardbentoError as exc:
        sender.deliver([(message.ticket, exc) for message in choices])
        return
    for seq in seqs:
        live[seq.channel] = seq  # before submit: the scheduler may finish it before submit returns
    try:
        scheduler.submit(*seqs)
    except Overloaded as exc:
        sender.deliver([(message.ticket, exc) for message in choices])


def _sequence(message: Submit, tokenizer: Any, eos_ids: set[int], grammars: Grammars) -> Sequence:
    sampler = RequestSampler(
        message.params, eos_ids=eos_ids, decode=lambda t: tokenizer.decode([t]), grammars=grammars
    )
    output = OutputStream(tokenizer, message.prompt_ids, message.params, eos_ids)
    return Sequence(message.request_id, list(message.prompt_ids), sampler, output, message.ticket)


def follow(runner: ModelRunner, control: Any) -> None:
    """A follower rank: replay rank 0's runner calls on this shard, in order, until Stop.

    A call that raises ends the process: the service's watchdog then stops serving, rather than
    leaving the ranks out of step.
    """
    with torch.inference_mode():
        while isinstance(call := control.get(), RunnerCall):
            getattr(runner, call.method)(*call.args)
