"""The service side of the engine process: requests to rank 0, its step reports back to each stream."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from shardbento.engine.base import Delta, DeltaChannel, Prompt, SamplingParams, StartTogether, choice_ids
from shardbento.engine.core.messages import Cancel, RankFailure, StepReport, Submit, SubmitChoices
from shardbento.engine.core.relay import apply_metrics
from shardbento.errors import NotReady
from shardbento.metrics import RequestMetrics

logger = logging.getLogger(__name__)

POLL_S = 0.1


class StreamRouter:
    """Sends requests to rank 0 and routes what it reports to each request's DeltaChannel.

    One router thread reads rank 0's StepReports: it applies their metric observations to this
    process's RequestMetrics (what /metrics serves) and hands each step's Deltas over with one
    wake-up of the event loop. A stream closed before its finishing Delta (client gone) sends a
    Cancel. `fail()` ends every open stream, and refuses new ones, with NotReady; so does a failed
    step while `why_down()` names a dead rank (the step failed because a peer vanished).
    """

    def __init__(
        self, requests: Any, results: Any, metrics: RequestMetrics, why_down: Callable[[], str | None]
    ) -> None:
        self._requests = requests
        self._results = results
        self._metrics = metrics
        self._why_down = why_down
        self._channels: dict[int, DeltaChannel] = {}
        self._tickets = itertools.count()
        self._lock = threading.Lock()
        self._failure: str | None = None
        self._router = threading.Thread(target=self._route, name="shardbento-router", daemon=True)
        self._router.start()

    def stream_choices(
        self, prompt: Prompt, params: list[SamplingParams], request_id: str
    ) -> list[AsyncIterator[Delta]]:
        """One stream per choice; rank 0 gets them in one message when the first stream starts."""

        def start() -> list[tuple[int, DeltaChannel]]:
            opened = [self._open(DeltaChannel()) for _ in params]
            ids = choice_ids(request_id, len(params))
            submits = tuple(
                Submit(ticket, rid, prompt, p)
                for (ticket, _), rid, p in zip(opened, ids, params, strict=True)
            )
            self._requests.put(submits[0] if len(submits) == 1 else SubmitChoices(submits))
            return opened

        together = StartTogether(start)
        return [self._follow(together, i) for i in range(len(params))]

    async def _follow(
        self, together: StartTogether[tuple[int, DeltaChannel]], index: int
    ) -> AsyncIterator[Delta]:
        ticket, channel = together.get(index)
        finished = False
        try:
            async for delta in channel.deltas():
                finished = delta.finish_reason is not None
                yield delta
        finally:
            with self._lock:
                self._channels.pop(ticket, None)
            if not finished and self._failure is None:
                self._requests.put(Cancel(ticket))  # rank 0 ignores tickets it no longer holds

    async def control(self, message_of: Callable[[int], Any]) -> None:
        """Send rank 0 a control message (an adapter load or unload) under a fresh ticket and wait for
        its answer: a finished Delta, or the failure raised here."""
        ticket, channel = self._open(DeltaChannel())
        try:
            self._requests.put(message_of(ticket))
            async for _ in channel.deltas():
                return
        finally:
            with self._lock:
                self._channels.pop(ticket, None)

    def _open(self, channel: DeltaChannel) -> tuple[int, DeltaChannel]:
        with self._lock:
            if self._failure is not None:
                raise NotReady(self._failure)
            ticket = next(self._tickets)
            self._channels[ticket] = channel
        return ticket, channel

    def fail(self, message: str) -> None:
        """End every open stream with NotReady(message); later streams are refused with it."""
        with self._lock:
            self._failure = message
            channels, self._channels = list(self._channels.values()), {}
        DeltaChannel.emit_all([(channel, NotReady(message)) for channel in channels])

    def _route(self) -> None:
        while self._failure is None:
            try:
                report = self._results.get(timeout=POLL_S)
            except queue.Empty:
                continue
            except (EOFError, OSError):  # rank 0 died mid-message; the watchdog fails the streams
                logger.warning("the engine's results channel broke")
                return
            self._deliver(report)

    def _deliver(self, report: StepReport) -> None:
        apply_metrics(self._metrics, report.metrics)
        with self._lock:
            routed = [(ticket, self._channels.get(ticket), item) for ticket, item in report.items]
        items = [(channel, self._item(item)) for _, channel, item in routed if channel is not None]
        gone = {id(channel) for channel in DeltaChannel.emit_all(items)}
        for ticket, channel, _ in routed:
            if channel is not None and id(channel) in gone:  # its event loop closed (shutdown)
                with self._lock:
                    self._channels.pop(ticket, None)
                self._requests.put(Cancel(ticket))

    def _item(self, item: Delta | RankFailure) -> Delta | BaseException:
        if not isinstance(item, RankFailure):
            return item
        down = self._why_down() if item.kind == "failed" else None
        return NotReady(down) if down else item.to_exception()
