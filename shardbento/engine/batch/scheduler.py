"""Continuous batching: one engine thread steps every running sequence together, newcomers join per step."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

import torch

from shardbento.catalog import ServingLimits
from shardbento.engine.base import Delta, DeltaChannel
from shardbento.engine.batch.adapters import NO_ADAPTERS
from shardbento.engine.batch.planner import (
    choose_chunks,
    join_twins,
    mixable,
    place,
    planned_rows,
    step_budgets,
)
from shardbento.engine.batch.prefix import PrefixCache, follow_moves
from shardbento.engine.batch.runner import ModelRunner, PrefillChunk, release_moves
from shardbento.engine.batch.sampler import prefetch_masks, select_tokens
from shardbento.engine.batch.sequence import Sequence, attach_scores, stream_token
from shardbento.errors import Overloaded
from shardbento.metrics import RequestMetrics

logger = logging.getLogger(__name__)


Outbox = list[tuple[Any, Delta | BaseException]]


class FatalEngineError(RuntimeError):
    """A failure after which the engine cannot go on (its ranks are out of step): the loop fails every
    request it holds and ends, so the process exits and the service stops serving (503)."""


class Scheduler:
    """Iteration-level batching over a ModelRunner, in the style of vLLM's scheduler.

    Each step computes at most the step's token budget (`max_num_batched_tokens`): one token for every
    running sequence and, in the same forward where the model was checked to allow it (a mixed step),
    waiting prompts' tokens in FIFO order: complete prompts together, then the next one's first chunk
    with what is left; a long prompt goes on a chunk a step, so a newcomer's prefill never stalls the
    running streams for more than one budget. Finished and cancelled sequences leave at the end of the
    step that sees them; a step's Deltas go out together (one event-loop wake-up). One thread owns the
    model: forward passes never overlap.
    """

    def __init__(
        self,
        runner: ModelRunner,
        limits: ServingLimits,
        metrics: RequestMetrics,
        deliver: Callable[[Outbox], list[Any]] = DeltaChannel.emit_all,
        start: bool = True,
    ) -> None:
        self._runner = runner
        self._limits = limits
        self._step_tokens = limits.step_tokens()
        self._metrics = metrics
        self._prefix = PrefixCache(runner) if limits.prefix_caching else None
        self._deliver = deliver
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._outbox: list[tuple[Sequence, Delta | BaseException]] = []
        self._chunking: Sequence | None = None  # the waiting head whose prompt is partly in the KV pool
        self._forward_s = 0.0  # this step's time inside the runner's forward calls
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()  # set when the loop has ended
        self._tasks: list[Callable[[], None]] = []  # call_soon's, run between steps
        self.adapters: Any = NO_ADAPTERS  # LoRA: an AdapterSlots admits waiting requests by adapter
        if start:
            threading.Thread(target=self.run, name="shardbento-scheduler", daemon=True).start()

    def submit(self, *seqs: Sequence) -> None:
        """Queue requests, all or none (the n choices of one prompt come together, so one prefill
        serves them all); past the waiting bound they are refused with a 429."""
        with self._wake:
            if len(self._waiting) + len(seqs) > self._limits.max_waiting + self._free_slots():
                raise Overloaded(
                    f"server is at capacity ({self._runner.kv.num_slots} running, "
                    f"{self._limits.max_waiting} waiting); retry later",
                    retry_after_s=1,
                )
            self._waiting.extend(seqs)
            self._metrics.waiting.set(len(self._waiting))
            self._wake.notify()

    def _free_slots(self) -> int:
        return self._runner.kv.num_slots - len(self._running)

    def call_soon(self, task: Callable[[], None]) -> None:
        """Run `task` on the engine thread between two steps (adapter loads: never during a forward)."""
        with self._wake:
            self._tasks.append(task)
            self._wake.notify()

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop after the current step (waiting for it, bounded); queued requests get no more tokens."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._stopped.wait(timeout_s)  # the loop, not its thread: an executor's thread lives on

    @property
    def is_alive(self) -> bool:
        """False once the loop has ended; True before it starts (queued on its engine thread)."""
        return not self._closed if self._thread is None else not self._stopped.is_set()

    def run(self) -> None:
        """The engine loop, on the calling thread until close(); `start=True` gives it its own thread.

        Running it on the thread that loaded the model matters on CPU: torch's OpenMP runtime keeps a
        worker pool per thread that ever ran a parallel op, and with more pool threads than cores it
        stops spinning between ops, which made every forward of a second thread ~40% slower here."""
        self._thread = threading.current_thread()
        try:
            self._loop()
        finally:
            self._stopped.set()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._running and not self._tasks:
                    self._wake.wait()
                if self._closed:
                    return
                tasks, self._tasks = self._tasks, []
            for task in tasks:
                task()
            try:
                with torch.inference_mode():
                    self._step()
            except FatalEngineError as exc:
                logger.error("engine step failed and the engine cannot go on: %s", exc)
                self._fail_all(exc, everything=True)
                self._flush()
                raise
            except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
                logger.exception("engine step failed; failing %d requests", len(self._running))
                self._fail_all(exc)
            self._flush()

    def _step(self) -> None:
        """One step, timed: the whole of it and the part outside the model's forward calls."""
        self._forward_s = 0.0
        started = time.perf_counter()
        self._compute()
        total = time.perf_counter() - started
        self._metrics.step.observe(total)
        self._metrics.step_host.observe(max(total - self._forward_s, 0.0))

    def _forward(self, method: str, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return getattr(self._runner, method)(*args)
        finally:
            self._forward_s += time.perf_counter() - started

    def _compute(self) -> None:
        self._drop_cancelled()
        chunks, groups = self._plan_prefill()
        if chunks and self._running and self._runner.can_mix() and all(map(mixable, chunks)):
            self._mixed(chunks, groups)
        else:
            ran = len(self._running)  # rows joining after these got their token from the prefill
            self._prefill(chunks, groups)
            self._flush()  # first tokens go out now, not after this step's decode forward
            self._preempt()
            if decoding := self._running[:ran]:  # one token a step, as vLLM: joiners keep in step
                masks = prefetch_masks([seq.sampler for seq in decoding])  # made during the forward
                tokens = [seq.next_token for seq in decoding]
                logits = self._forward("decode", tokens, *self.adapters.slots(decoding))
                self._advance(list(range(len(decoding))), logits, masks)
        self._metrics.running.set(len(self._running))
        self._metrics.waiting.set(len(self._waiting))
        self._metrics.kv_usage.set(self._runner.kv.usage())

    def _preempt(self) -> None:
        """Until the running set's next tokens fit the KV pool: the newest sequence leaves the batch (its
        KV freed) for the front of the queue, to be prefilled again (with what it generated)."""
        kv = self._runner.kv

        def fits() -> bool:  # after evicting cached blocks, if that is enough: they go first
            rows, longest = len(self._running), max(kv.lengths[: len(self._running)]) + 1
            if self._prefix is not None:
                self._prefix.make_room(rows, longest)
            return kv.holds(rows, longest)

        if not self._running:
            return
        if not fits() and self._chunking is not None:  # fits() runs first: a single row's room too
            self._abandon_chunking()  # then a partly prefilled prompt's row: it starts again later
        while len(self._running) > 1 and not fits():
            row = max(range(len(self._running)), key=lambda r: self._running[r].seq_id)
            seq = self._running[row]
            self._release([row])
            seq.num_prefilled = 0
            with self._wake:
                self._waiting.appendleft(seq)
            self._metrics.preemptions.inc()

    def _abandon_chunking(self) -> None:
        """The partly prefilled head gives its KV row back and will be prefilled from its start."""
        seq, self._chunking = self._chunking, None
        self._runner.drop(seq.seq_id)
        seq.num_prefilled = seq.cached = 0

    def _drop_cancelled(self) -> None:
        with self._wake:
            for seq in [s for s in self._waiting if s.cancelled]:
                self._waiting.remove(seq)
                self._runner.drop(seq.seq_id)
                self._metrics.finished("abort")
                if seq is self._chunking:
                    self._chunking = None
        gone = [i for i, seq in enumerate(self._running) if seq.cancelled]
        for _ in gone:
            self._metrics.finished("abort")
        self._release(gone)

    def _mixed(self, chunks: list[PrefillChunk], groups: list[list[Sequence]]) -> None:
        """The running sequences' next tokens and the step's prompts in one forward (runner.mixed): the
        prompts cost no separate decode forward (the plan left room for both)."""
        running = len(self._running)
        masks = prefetch_masks([seq.sampler for seq in self._running])  # the joining rows' come after
        tokens = [seq.next_token for seq in self._running]
        prompts, decoded = self._forward("mixed", chunks, tokens, *self.adapters.slots(self._running))
        rows, joined = self._join(chunks, groups)
        self._advance([*range(running), *rows], torch.cat([decoded, prompts[joined]]), masks)

    def _prefill(self, chunks: list[PrefillChunk], groups: list[list[Sequence]]) -> None:
        if not chunks:
            return
        logits = self._forward("prefill", chunks)
        rows, joined = self._join(chunks, groups)
        if joined:
            self._advance(rows, logits[joined])

    def _join(self, chunks: list[PrefillChunk], groups: list[list[Sequence]]) -> tuple[list[int], list[int]]:
        """The sequences whose prompts this step completed join the batch (their twins beside them) and
        their prompts' blocks are cached; their rows, and the indices of the chunks they came from."""
        first_row = len(self._running)
        joined = []
        for row, (chunk, group) in enumerate(zip(chunks, groups, strict=True)):
            group[0].num_prefilled = chunk.start + len(chunk.token_ids)
            if chunk.slot is None:
                self._chunking = group[0]
                continue  # the rest of this prompt goes in the next step
            if group[0] is self._chunking:
                self._chunking = None
            if chunk.scored is not None:  # its first Delta carries them; a failure to compute them fails it
                scores = self._runner.take_scores(group[0].seq_id)
                self._outbox += [(seq, scores) for seq in attach_scores(group, scores)]
            with self._wake:
                for seq in group:
                    self._waiting.remove(seq)
            for seq in group:  # the twins' prompts were not computed: they copy the first one's KV
                if not seq.generated:  # a preempted sequence's prompt was counted when it first came
                    self._metrics.prompt_tokens.inc(len(seq.prompt_ids))
                    if chunk.scored is None or seq is not group[0]:  # a scored prompt looks nothing up
                        self._metrics.prefix_queries.inc(len(seq.prompt_ids))
                self._running.append(seq)
                joined.append(row)
            self._metrics.prefix_hits.inc(len(group[0].prompt_ids) * (len(group) - 1))
            if not group[0].generated:
                self._metrics.prefix_hits.inc(group[0].cached)
        self._remember(range(first_row, len(self._running)))
        return list(range(first_row, len(self._running))), joined

    def _remember(self, rows: Iterable[int]) -> None:
        """Cache the full blocks these rows' KV holds (a prompt as it joins, a whole answer as it ends)."""
        if self._prefix is not None:
            self._prefix.remember_rows(self._running, list(rows))

    def _plan_prefill(self) -> tuple[list[PrefillChunk], list[list[Sequence]]]:
        """This step's prompt chunks, each with the sequences it serves (planner.choose_chunks): what
        fits the step's token budget beside the running sequences' decode tokens when they share the
        forward (a mixed step), else the whole budget. A waiting text prompt equal to one that completes
        here (the n choices of a request) joins it as a twin: it takes a slot and that prompt's KV, no
        compute. Nothing joins that the KV pool cannot hold beside the running sequences' next tokens;
        cached blocks are evicted for what joins."""
        with self._wake:
            candidates = list(self._waiting)[: self._free_slots()]  # the adapters' slots may hold fewer
            candidates = self.adapters.admit(candidates, self._running, self._chunking, self._waiting)
        if not candidates:
            return [], []
        kv = self._runner.kv
        running = len(self._running)
        grown = max(kv.lengths[:running], default=0) + 1
        head = candidates[0]
        if self._chunking is not None and self._chunking is not head:  # a preempted sequence went first
            self._abandon_chunking()
        hit = self._hit(head)
        keep: set[int] = set()  # the cached blocks this step's prompts read: never evicted for them

        def room(rows: int, longest: int, blocks: list[int]) -> bool:  # other cached blocks may go
            return kv.holds(running + rows, max(grown, longest + 1), prefix_blocks=len(keep.union(blocks)))

        packs, images_free = self._runner.packs, self._runner.image_rows_free()
        budget, least = step_budgets(self._step_tokens, running, len(candidates), self._runner.can_mix())
        for head_hit in (hit, []) if hit else ([],):  # a head that fits only without its hit goes without
            hit_of = lambda i: head_hit if i == 0 else self._hit(candidates[i])  # noqa: E731, B023 - lazily
            planned = choose_chunks(candidates, hit_of, budget, room, keep, packs, grown, images_free, least)
            if planned:
                break
        join_twins(planned, candidates, room)
        if self._prefix is not None:
            longest = max([grown, *(len(group[0].context()) + 1 for _, group in planned)])
            new_rows = any(not group[0].num_prefilled for _, group in planned)  # rows the planner checked
            moves = self._prefix.make_room(
                running + planned_rows(planned), longest, frozenset(keep), new_rows
            )
            planned = follow_moves(planned, moves)  # a kept block may have moved: read it where it is
        for seq in (seq for _, group in planned for seq in group if not seq.num_prefilled):
            if not seq.generated:
                self._metrics.queue.observe(time.monotonic() - seq.arrival_s)
        return place(planned, len(self._running)), [group for _, group in planned]

    def _hit(self, seq: Sequence) -> list[int]:
        return [] if self._prefix is None else self._prefix.start_of(seq)

    def _advance(
        self, rows: list[int], logits: torch.Tensor, masks: Future[torch.Tensor] | None = None
    ) -> None:
        """Pick, stream and account one token for each of `rows` (logits and `masks` in the same order)."""
        seqs = [self._running[row] for row in rows]
        tokens = select_tokens([seq.sampler for seq in seqs], logits, masks)
        done, failed = [], []
        for row, seq, token in zip(rows, seqs, tokens, strict=True):
            if seq.sampler.failure is not None:  # its constraint left no token: it alone ends, saying why
                failed.append(row)
                self._metrics.finished("error")
                self._outbox.append((seq, seq.sampler.failure))
            elif self._accept(seq, token):
                done.append(row)
        self._remember(done)
        self._release([*done, *failed])

    def _accept(self, seq: Sequence, token: int) -> bool:
        """Stream the sequence's next token; True when the sequence is finished."""
        delta = stream_token(seq, token, self._metrics)
        self._outbox.append((seq, delta))
        return delta.finish_reason is not None

    def _release(self, rows: list[int]) -> None:
        """Remove rows from the batch, keeping the rest in slots 0..n-1 (the last row fills each gap)."""
        self._runner.release(rows)
        for row, last in release_moves(rows, len(self._running)):
            self._running[row] = self._running[last]
            self._running.pop()

    def _flush(self) -> None:
        """Send the step's Deltas; a request whose event loop is gone is cancelled."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, []
        gone = {id(channel) for channel in self._deliver([(seq.channel, item) for seq, item in outbox])}
        for seq, _ in outbox:
            if id(seq.channel) in gone:
                seq.cancelled = True

    def _fail_all(self, exc: BaseException, everything: bool = False) -> None:
        """Fail what the step was computing: the running sequences and the partly prefilled ones; with
        none of those, the head of the queue (the step was planning it), so a step that keeps failing
        still ends a request each time instead of retrying the same plan forever. `everything`: the
        waiting ones too (the engine stops)."""
        with self._wake:
            failed = [*self._running, *(s for s in self._waiting if s.num_prefilled or everything)]
            if not failed and self._waiting:
                failed = [self._waiting[0]]
            if everything:
                self._closed = True
            for seq in failed:
                self._runner.take_scores(seq.seq_id)
                if seq in self._waiting:
                    self._waiting.remove(seq)
                    self._runner.drop(seq.seq_id)
            self._chunking = None
        self._runner.clear_rows()  # every row, those the failed step laid out or began included
        self._running.clear()
        self._outbox = [item for item in self._outbox if item[0] not in failed]
        for seq in failed:
            self._metrics.finished("error")
            self._outbox.append((seq, exc))
