"""Rank 0 of the engine process(es): its loop (the Scheduler, or one-at-a-time generate()) over a runner
whose every call the other ranks replay, requests in from the service, step reports out."""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from shardbento.engine.base import Delta, Prompt, SamplingParams
from shardbento.engine.batch.scheduler import FatalEngineError, Sequence
from shardbento.engine.core.messages import (
    MIRRORED_METHODS,
    Cancel,
    LoadAdapter,
    RankFailure,
    RunnerCall,
    StepReport,
    Stop,
    Submit,
    SubmitChoices,
    UnloadAdapter,
)
from shardbento.engine.core.relay import MetricsRelay
from shardbento.engine.hf.preprocess import Preprocessor
from shardbento.engine.output import OutputStream
from shardbento.errors import ShardbentoError

logger = logging.getLogger(__name__)

POLL_S = 0.1  # how often an idle rank 0 ships metric observations that no Delta carried


class RanksOutOfStep(FatalEngineError):
    """Rank 0's part of a mirrored call failed after the followers started theirs: they are inside that
    call's collectives and every later call would meet the wrong one, so the ranks must end."""


class InjectedFault(RuntimeError):
    """A test-only fault (RankConfig.fault) in rank 0's half of a runner call."""


class MirrorRunner:
    """Rank 0's runner: each state-changing call goes to every follower first, then runs here, so all
    ranks run the same forwards and meet in the same collectives; only rank 0 gets logits it uses.
    Other attributes (kv, packs, mixes) are the local runner's. With no followers it is the runner.
    """

    def __init__(self, runner: Any, control: tuple[Any, ...], fault: str | None = None) -> None:
        self._runner = runner
        self._control = control
        self._fault_method, _, at = (fault or "").partition("@")
        self._fault_at = int(at or 0)
        self._calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        if name in MIRRORED_METHODS:
            return functools.partial(self._call, name)
        return getattr(self._runner, name)

    def _call(self, method: str, *args: Any) -> Any:
        for follower in self._control:
            follower.put(RunnerCall(method, args))  # type: ignore[arg-type]
        try:
            self._calls[method] = self._calls.get(method, 0) + 1
            if method == self._fault_method and self._calls[method] == self._fault_at:
                raise InjectedFault(f"injected fault in rank 0's {method} call #{self._fault_at}")
            return getattr(self._runner, method)(*args)
        except Exception as exc:
            if self._control:
                raise RanksOutOfStep(
                    f"rank 0 failed in {method} after the other ranks began it ({type(exc).__name__}: {exc}); "
                    "the ranks are out of step and stop"
                ) from exc
            raise


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


@dataclass(frozen=True)
class SequenceFactory:
    """Rank 0 turns a Submit into a Sequence: its sampler (EOS ids, grammar), its output stream (where
    stop strings and EOS end it), and a vision prompt's pixels and prefix-cache key."""

    prompts: Preprocessor
    image_token_id: int | None = None
    caches_image_prefixes: bool = False  # rotary positions are the cache index (LLaVA family)
    adapters: Any = None  # AdapterRegistry: a request's LoRA adapter name to its id

    def __call__(self, message: Submit) -> Sequence:
        return self.sequence(message.request_id, message.prompt, message.params, message.ticket)

    def sequence(self, request_id: str, prompt: Prompt, params: SamplingParams, channel: Any) -> Sequence:
        """The Sequence of one request whose Deltas the loop's `deliver` hands to `channel`."""
        prompts = self.prompts
        output = OutputStream(prompts.tokenizer, prompt.token_ids, params, set(prompts.eos_token_ids))
        sampler = prompts.sampler(params, prompt.token_ids)
        seq = Sequence(request_id, list(prompt.token_ids), sampler, output, channel)
        seq.scoring = params.prompt_logprobs
        if prompt.num_images:
            seq.inputs = dict(prompt.inputs)
            if self.caches_image_prefixes and self.image_token_id in prompt.token_ids:
                seq.prefix_salt = prompt.images_digest
                seq.image_end = len(prompt.token_ids) - prompt.token_ids[::-1].index(self.image_token_id)
        if params.adapter is not None:
            seq.adapter = self.adapters.id_of(params.adapter)  # ModelNotFound: unloaded meanwhile
            if seq.inputs is None or seq.prefix_salt:  # its cached blocks are its adapter's alone
                seq.prefix_salt = hash((seq.prefix_salt, self.adapters.salt(seq.adapter))) or 1
        return seq


def lead(
    loop_of: Callable[[MirrorRunner, MetricsRelay, Callable[..., list[Any]]], Any],
    runner: Any,
    make_sequence: SequenceFactory,
    channels: Any,
    fault: str | None = None,
    adapters: Any = None,
) -> None:
    """Rank 0: run the serving loop (`loop_of(mirror, metrics, deliver)`, a Scheduler or a GenerateLoop)
    until the service sends Stop; then stop the followers. A fatal failure ends it early (the process
    exits, the service answers 503 and stops the other ranks). `adapters` (an AdapterControl) answers
    the service's adapter loads and unloads."""
    relay = MetricsRelay()
    live: dict[int, Sequence] = {}
    sender = ReportSender(channels.results, relay, live)
    mirror = MirrorRunner(runner, channels.control, fault)
    loop = loop_of(mirror, relay, sender.deliver)
    intake = threading.Thread(
        target=_intake,
        args=(loop, channels.requests, make_sequence, live, sender, adapters),
        name="shardbento-intake",
        daemon=True,
    )
    intake.start()
    try:
        with torch.inference_mode():
            loop.run()  # on the thread that loaded the model: see Scheduler.run
    finally:
        sender.flush_metrics()
        for follower in channels.control:
            follower.put(Stop())


def _intake(
    loop: Any,
    requests: Any,
    make_sequence: SequenceFactory,
    live: dict[int, Sequence],
    sender: ReportSender,
    adapters: Any = None,
) -> None:
    """Rank 0's request thread: Submit and Cancel into the loop until Stop, which closes it."""
    try:
        while loop.is_alive:
            try:
                message = requests.get(timeout=POLL_S)
            except queue.Empty:
                sender.flush_metrics()
                continue
            if isinstance(message, Submit | SubmitChoices):
                choices = message.choices if isinstance(message, SubmitChoices) else (message,)
                _admit(loop, choices, make_sequence, live, sender)
            elif isinstance(message, Cancel):
                seq = live.pop(message.ticket, None)
                if seq is not None:
                    seq.cancelled = True
                    loop.wake()
            elif isinstance(message, LoadAdapter | UnloadAdapter) and adapters is not None:
                adapters.handle(message)
            elif isinstance(message, Stop):
                break
    finally:
        loop.close()


def _admit(
    loop: Any,
    choices: tuple[Submit, ...],
    make_sequence: SequenceFactory,
    live: dict[int, Sequence],
    sender: ReportSender,
) -> None:
    """Sequences for the request's choices, queued together; a 429 or a grammar refusal goes straight
    back to every choice."""
    try:
        seqs = [make_sequence(message) for message in choices]
    except ShardbentoError as exc:
        sender.deliver([(message.ticket, exc) for message in choices])
        return
    for seq in seqs:
        live[seq.channel] = seq  # before submit: the loop may finish it before submit returns
    try:
        loop.submit(*seqs)
    except ShardbentoError as exc:  # a 429 at capacity, or what this loop cannot serve
        for seq in seqs:
            live.pop(seq.channel, None)
        sender.deliver([(message.ticket, exc) for message in choices])


def follow(runner: Any, control: Any) -> None:
    """A follower rank: replay rank 0's runner calls on this shard, in order, until Stop.

    A call that raises ends the process: the service's watchdog then stops serving, rather than
    leaving the ranks out of step. A follower computes no prompt logprobs (rank 0 delivers them).
    """
    if hasattr(runner, "keeps_scores"):
        runner.keeps_scores = False
    with torch.inference_mode():
        while isinstance(call := control.get(), RunnerCall):
            getattr(runner, call.method)(*call.args)
