"""Rank 0's control path in one process: its scheduler over a mirroring runner, a follower replaying its
calls, step reports, 429s, cancellation, relayed metrics, and a failure in rank 0's half of a call."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import torch
from prometheus_client import REGISTRY

from shardbento.catalog import ServingLimits
from shardbento.engine.base import ChatMessage, Constraint, Delta, SamplingParams
from shardbento.engine.batch.runner import ModelRunner
from shardbento.engine.batch.scheduler import Scheduler
from shardbento.engine.core.lead import RanksOutOfStep, SequenceFactory, follow, lead
from shardbento.engine.core.messages import Cancel, RankFailure, Stop, Submit, SubmitChoices
from shardbento.engine.core.relay import apply_metrics
from shardbento.errors import Overloaded
from shardbento.metrics import RequestMetrics

QUESTIONS = ("Hi.", "Tell me about the sharded bento and its many GPUs.", "Count " * 40)


@contextlib.contextmanager
def ranks(loaded, limits: ServingLimits, fault: str | None = None) -> Iterator[SimpleNamespace]:
    """Rank 0 and one follower as threads over the same (unsharded) model, wired like spawned ranks; a
    lead that raises leaves its exception in `errors`."""
    leader, follower = (ModelRunner(loaded.model, limits.max_num_seqs, 1024) for _ in range(2))
    channels = SimpleNamespace(requests=queue.Queue(), results=queue.Queue(), control=(queue.SimpleQueue(),))
    errors: list[BaseException] = []

    def loop_of(mirror, metrics, deliver):
        return Scheduler(mirror, limits, metrics, deliver=deliver, start=False)

    def run_lead() -> None:
        try:
            lead(loop_of, leader, SequenceFactory(loaded.prompts), channels, fault)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    threads = [
        threading.Thread(target=run_lead, daemon=True),
        threading.Thread(target=follow, args=(follower, channels.control[0]), daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        yield SimpleNamespace(
            channels=channels, leader=leader, follower=follower, errors=errors, threads=threads
        )
    finally:
        channels.requests.put(Stop())
        for thread in threads:
            thread.join(timeout=30)


def reports(
    channels: SimpleNamespace, until: Callable[[list, list], bool], timeout_s: float = 60
) -> tuple[list, list]:
    """StepReports until `until(items, ops)` holds for everything received so far."""
    items, ops = [], []
    deadline = time.monotonic() + timeout_s
    while not until(items, ops):
        report = channels.results.get(timeout=max(deadline - time.monotonic(), 0.01))
        items.extend(report.items)
        ops.extend(report.metrics)
    return items, ops


def finished(tickets: set[int]) -> Callable[[list, list], bool]:
    def done(items: list, ops: list) -> bool:
        ended = {t for t, item in items if isinstance(item, RankFailure) or item.finish_reason}
        return tickets <= ended

    return done


def tokens(items: list, ticket: int) -> list[int]:
    return [t for tk, item in items if tk == ticket and isinstance(item, Delta) for t in item.token_ids]


def count_prefills(runner) -> list[int]:
    """The prompt tokens each chunk `runner` prefills from now on (its prefill wrapped, still run)."""
    computed: list[int] = []
    prefill = runner.prefill

    def counting(chunks):
        computed.extend(len(chunk.token_ids) for chunk in chunks)
        return prefill(chunks)

    runner.prefill = counting
    return computed


def single_process(engine, prompt, params) -> list[int]:
    """The request alone through rank 0's loop in this process, no follower."""

    async def run() -> list[int]:
        return [t async for d in engine.stream(prompt, params, "ref") for t in d.token_ids]

    return asyncio.run(run())


def test_lead_batched_tokens_equal_single_process_and_follower_keeps_step(text_model, text_inprocess) -> None:
    prompts = [text_model.prompts.render_chat([ChatMessage(role="user", text=q)]) for q in QUESTIONS]
    params = [SamplingParams(max_tokens=6 + 4 * i, ignore_eos=True) for i in range(len(prompts))]
    expected = [single_process(text_inprocess, p, s) for p, s in zip(prompts, params, strict=True)]
    with ranks(text_model, ServingLimits(max_num_seqs=4, max_prefill_tokens=64)) as world:
        for ticket, (prompt, sampling) in enumerate(zip(prompts, params, strict=True)):
            world.channels.requests.put(Submit(ticket, f"req-{ticket}", prompt, sampling))
        items, ops = reports(world.channels, finished({0, 1, 2}))
    assert [tokens(items, ticket) for ticket in range(3)] == expected
    assert world.follower.kv.lengths == world.leader.kv.lengths
    assert world.follower.num_rows == world.leader.num_rows == 0
    metrics = RequestMetrics("tp-unit")
    apply_metrics(metrics, ops)
    labels = {"model_name": "tp-unit"}
    assert REGISTRY.get_sample_value("shardbento:generation_tokens_total", labels) == sum(map(len, expected))
    assert REGISTRY.get_sample_value("shardbento:time_to_first_token_seconds_count", labels) == 3


def test_lead_overload_reaches_service_as_429(text_model) -> None:
    prompt = text_model.prompts.encode("The quick brown fox")
    with ranks(text_model, ServingLimits(max_num_seqs=1, max_waiting=0)) as world:
        for ticket in range(2):
            params = SamplingParams(max_tokens=40, ignore_eos=True)
            world.channels.requests.put(Submit(ticket, "req", prompt, params))
        items, _ = reports(world.channels, finished({0, 1}))
    refused = [item for ticket, item in items if ticket == 1]
    assert len(refused) == 1 and isinstance(refused[0], RankFailure)
    error = refused[0].to_exception()
    assert isinstance(error, Overloaded)
    assert (error.status, error.headers()) == (429, {"Retry-After": "1"})
    assert len(tokens(items, 0)) == 40


def test_lead_cancel_frees_slot_and_reports_abort(text_model) -> None:
    prompt = text_model.prompts.encode("Once upon a time")
    with ranks(text_model, ServingLimits(max_num_seqs=2)) as world:
        params = SamplingParams(max_tokens=500, ignore_eos=True)
        world.channels.requests.put(Submit(7, "req", prompt, params))
        reports(world.channels, lambda items, ops: bool(items))
        world.channels.requests.put(Cancel(7))
        freed = {("finished", "finished", "abort"), ("running", "set", 0)}
        reports(world.channels, lambda items, ops: freed <= set(ops))
    assert world.follower.num_rows == world.leader.num_rows == 0


def test_lead_constrained_requests_sample_on_rank_0_as_in_one_process(text_model, text_inprocess) -> None:
    schema = {"type": "object", "properties": {"pick": {"enum": ["a", "b", "c"]}}, "required": ["pick"]}
    constraint = Constraint("json_schema", json.dumps(schema))
    prompts = [text_model.prompts.render_chat([ChatMessage(role="user", text=q)]) for q in QUESTIONS]
    params = [SamplingParams(max_tokens=30, constraint=constraint), SamplingParams(max_tokens=8)] * 2
    params = params[: len(prompts)]
    expected = [single_process(text_inprocess, p, s) for p, s in zip(prompts, params, strict=True)]
    with ranks(text_model, ServingLimits(max_num_seqs=4, max_prefill_tokens=64)) as world:
        for ticket, (prompt, sampling) in enumerate(zip(prompts, params, strict=True)):
            world.channels.requests.put(Submit(ticket, f"req-{ticket}", prompt, sampling))
        items, _ = reports(world.channels, finished(set(range(len(prompts)))))
    assert [tokens(items, ticket) for ticket in range(len(prompts))] == expected
    constrained = text_model.prompts.tokenizer.decode(expected[0], skip_special_tokens=True)
    assert json.loads(constrained)["pick"] in ("a", "b", "c")


def test_lead_choices_prefill_once_on_every_rank(text_model, text_inprocess) -> None:
    """SubmitChoices: one prefill on rank 0 and on the follower, each choice as in one process."""
    prompt = text_model.prompts.render_chat([ChatMessage(role="user", text=QUESTIONS[1])])
    params = [SamplingParams(max_tokens=7, temperature=1.0, seed=3 + i, ignore_eos=True) for i in range(3)]
    expected = [single_process(text_inprocess, prompt, p) for p in params]
    with ranks(text_model, ServingLimits(max_num_seqs=4)) as world:
        computed = count_prefills(world.follower)
        choices = tuple(Submit(t, f"req-{t}", prompt, p) for t, p in enumerate(params))
        world.channels.requests.put(SubmitChoices(choices))
        items, _ = reports(world.channels, finished({0, 1, 2}))
    assert [tokens(items, ticket) for ticket in range(3)] == expected
    assert computed == [prompt.num_tokens]
    assert world.follower.kv.lengths == world.leader.kv.lengths


def test_lead_prefix_cache_decided_on_rank_0_mirrored_by_the_follower(text_model, text_inprocess) -> None:
    prompt = text_model.prompts.render_chat([ChatMessage(role="user", text=" ".join(QUESTIONS) * 2)])
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    expected = single_process(text_inprocess, prompt, params)
    with ranks(text_model, ServingLimits(max_num_seqs=4)) as world:
        per_request = []
        for ticket in range(2):  # one after the other: the second finds the first's blocks
            computed = count_prefills(world.follower)
            world.channels.requests.put(Submit(ticket, f"req-{ticket}", prompt, params))
            items, _ = reports(world.channels, finished({ticket}))
            assert tokens(items, ticket) == expected
            per_request.append(sum(computed))
    assert per_request[1] < prompt.num_tokens == per_request[0]  # the second started past the cache
    assert world.follower.kv.prefix_blocks == world.leader.kv.prefix_blocks > 0
    leader, follower = (
        w.kv._prefix_view(0, 0)[-world.leader.kv.prefix_blocks :] for w in (world.leader, world.follower)
    )
    assert torch.equal(leader, follower)


def test_lead_failure_in_rank_0s_half_of_a_call_ends_the_ranks(text_model) -> None:
    """Rank 0 fails in a decode the follower already began (in a real world it now waits in that
    forward's collectives): every request ends with the failure, the lead stops with RanksOutOfStep (the
    rank process exits, the service answers 503), and the follower is told to stop. Nothing hangs."""
    prompt = text_model.prompts.encode("Once upon a time")
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    with ranks(text_model, ServingLimits(max_num_seqs=4), fault="decode@3") as world:
        for ticket in range(2):
            world.channels.requests.put(Submit(ticket, f"req-{ticket}", prompt, params))
        items, _ = reports(world.channels, finished({0, 1}))
        for thread in world.threads:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in world.threads)
    assert len(world.errors) == 1 and isinstance(world.errors[0], RanksOutOfStep)
    failures = {ticket: item for ticket, item in items if isinstance(item, RankFailure)}
    assert set(failures) == {0, 1}
    assert all("out of step" in failure.message for failure in failures.values())


def test_lead_failure_with_no_followers_fails_the_step_and_serves_on(text_model) -> None:
    """A world of one has no collectives to fall out of: a failed call fails that step's requests and
    the engine serves the next one."""
    channels = SimpleNamespace(requests=queue.Queue(), results=queue.Queue(), control=())
    runner = ModelRunner(text_model.model, 4, 1024)
    limits = ServingLimits(max_num_seqs=4)

    def loop_of(mirror, metrics, deliver):
        return Scheduler(mirror, limits, metrics, deliver=deliver, start=False)

    args = (loop_of, runner, SequenceFactory(text_model.prompts), channels, "decode@2")
    thread = threading.Thread(target=lead, args=args, daemon=True)
    thread.start()
    prompt = text_model.prompts.encode("Once upon a time")
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    try:
        channels.requests.put(Submit(0, "req-0", prompt, params))
        first, _ = reports(channels, finished({0}))
        channels.requests.put(Submit(1, "req-1", prompt, params))
        second, _ = reports(channels, finished({1}))
    finally:
        channels.requests.put(Stop())
        thread.join(timeout=30)
    assert isinstance(first[-1][1], RankFailure) and "injected fault" in first[-1][1].message
    assert len(tokens(second, 1)) == 5 and not thread.is_alive()
