"""The continuous-batching scheduler: batched results equal unbatched ones, per-request limits hold."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from inprocess import InProcessEngine
from prometheus_client import REGISTRY

from shardbento.catalog import ServingLimits
from shardbento.engine.base import ChatMessage, Constraint, SamplingParams
from shardbento.errors import Overloaded

QUESTIONS = ("Hi.", "Tell me about the sharded bento and its many GPUs.", "Why?", "Count " * 40)


def prompts(engine):
    return [engine.render_chat([ChatMessage(role="user", text=q)]) for q in QUESTIONS]


async def collect(engine, prompt, params):
    deltas = [d async for d in engine.stream(prompt, params, "test")]
    return [t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas), deltas[-1].finish_reason


def alone(engine, pairs):
    async def run():
        return [await collect(engine, p, params) for p, params in pairs]

    return asyncio.run(run())


def together(engine, pairs):
    async def run():
        return await asyncio.gather(*(collect(engine, p, params) for p, params in pairs))

    return asyncio.run(run())


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"shardbento:{name}", {"model_name": "tiny-llama", **labels}) or 0.0


def test_scheduler_batched_greedy_equals_unbatched(text_engine) -> None:
    pairs = [
        (p, SamplingParams(max_tokens=12 + 5 * i, ignore_eos=True))
        for i, p in enumerate(prompts(text_engine))
    ]
    assert together(text_engine, pairs) == alone(text_engine, pairs)


def test_scheduler_prompts_arriving_mid_decode_join_in_mixed_steps_with_unbatched_tokens(
    text_inprocess,
) -> None:
    """Requests arriving while another decodes are prefilled in its decode forward (a mixed step, counted
    here); every request's greedy tokens equal its unbatched ones, constrained ones too (the running
    row's grammar mask made during the forward, the joining row's after it)."""
    items = {"type": "array", "items": {"enum": ["alpha", "beta"]}, "minItems": 12, "maxItems": 12}
    schema = {"type": "object", "properties": {"items": items}, "required": ["items"]}
    constraint = Constraint("json_schema", json.dumps(schema))
    ps = prompts(text_inprocess)
    pairs = [
        (ps[0], SamplingParams(max_tokens=200, constraint=constraint)),  # ends with its array
        (ps[1], SamplingParams(max_tokens=24, ignore_eos=True)),
        (ps[2], SamplingParams(max_tokens=200, constraint=constraint)),
        (ps[3], SamplingParams(max_tokens=24, ignore_eos=True)),
    ]
    scheduler = text_inprocess.scheduler
    runner = text_inprocess.runner
    calls = []
    mixed = runner.mixed
    runner.mixed = lambda chunks, tokens: calls.append(len(chunks)) or mixed(chunks, tokens)

    async def wait_for(condition) -> None:
        for _ in range(2000):  # bounded
            if condition():
                return
            await asyncio.sleep(0.005)
        raise AssertionError("the scheduler never reached the state the test waits for")

    async def staggered():
        first = asyncio.ensure_future(collect(text_inprocess, *pairs[0]))
        await wait_for(lambda: scheduler._running and len(scheduler._running[0].generated) >= 2)
        with scheduler._wake:  # the engine thread waits at its next step until all three are queued
            assert len(scheduler._running) == 1
            later = [asyncio.ensure_future(collect(text_inprocess, *pair)) for pair in pairs[1:]]
            await wait_for(lambda: len(scheduler._waiting) == 3)
        return [await first, *[await task for task in later]]

    try:
        got = asyncio.run(staggered())
    finally:
        del runner.mixed
    assert calls, "no request joined in a mixed step"
    assert got == alone(text_inprocess, pairs)
    assert all(json.loads(text)["items"] for _, text, _ in (got[0], got[2]))


def test_scheduler_stop_and_max_tokens_hold_inside_batch(text_engine) -> None:
    ps = prompts(text_engine)
    _, free_text, _ = alone(text_engine, [(ps[1], SamplingParams(max_tokens=30, ignore_eos=True))])[0]
    stop = free_text[len(free_text) // 2 : len(free_text) // 2 + 3]
    pairs = [
        (ps[1], SamplingParams(max_tokens=30, ignore_eos=True, stop=(stop,))),
        (ps[0], SamplingParams(max_tokens=3, ignore_eos=True)),
        (ps[2], SamplingParams(max_tokens=17, ignore_eos=True)),
    ]
    stopped, short, longer = together(text_engine, pairs)
    assert stopped[1] == free_text[: free_text.find(stop)] and stopped[2] == "stop"
    assert (len(short[0]), short[2]) == (3, "length")
    assert (len(longer[0]), longer[2]) == (17, "length")


def test_scheduler_seed_reproducible_inside_batch(text_engine) -> None:
    ps = prompts(text_engine)
    seeded = SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True)
    others = [(p, SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)) for p in ps[1:]]
    reference = alone(text_engine, [(ps[0], seeded)])[0]
    assert together(text_engine, [(ps[0], seeded), *others])[0] == reference


def test_scheduler_cancel_frees_slot(text_engine) -> None:
    prompt = prompts(text_engine)[1]
    aborted = metric("request_success_total", finished_reason="abort")

    async def leave_early():
        stream = text_engine.stream(prompt, SamplingParams(max_tokens=500, ignore_eos=True), "gone")
        await anext(stream)
        await stream.aclose()
        for _ in range(400):  # the slot is freed at the engine's next step
            if metric("request_success_total", finished_reason="abort") == aborted + 1:
                return metric("num_requests_running") == 0
            await asyncio.sleep(0.05)
        return False

    assert asyncio.run(leave_early())
    assert metric("num_requests_running") == 0


class PoisonedRunner:
    """The engine's runner, except that a prefill of the poisoned prompt raises (a step that keeps failing)."""

    def __init__(self, runner, poison: tuple[int, ...]) -> None:
        self._runner, self._poison = runner, poison

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def prefill(self, chunks):
        n = len(self._poison)
        if any(self._poison in {c.token_ids[i : i + n] for i in range(len(c.token_ids))} for c in chunks):
            raise RuntimeError("poisoned prompt")
        return self._runner.prefill(chunks)


def test_scheduler_step_that_keeps_failing_fails_its_request_and_serves_the_next(text_model) -> None:
    """A failing step with nothing running fails the queue's head (before, it retried the same plan
    forever and the request never answered); the next request is served."""
    engine = InProcessEngine(text_model, ServingLimits(max_prefill_tokens=512))
    poisoned, fine = prompts(engine)[1], prompts(engine)[0]
    engine.scheduler._runner = PoisonedRunner(engine.runner, tuple(poisoned.token_ids[4:9]))
    params = SamplingParams(max_tokens=4, ignore_eos=True)

    async def run():
        with pytest.raises(RuntimeError, match="poisoned"):
            await asyncio.wait_for(collect(engine, poisoned, params), timeout=60)
        return await asyncio.wait_for(collect(engine, fine, params), timeout=60)

    try:
        tokens, _, reason = asyncio.run(run())
    finally:
        engine.close()
    assert len(tokens) == 4 and reason == "length"


def test_scheduler_overloaded_past_waiting_limit(text_model) -> None:
    engine = InProcessEngine(text_model, ServingLimits(max_num_seqs=1, max_waiting=1))
    prompt = prompts(engine)[0]
    params = SamplingParams(max_tokens=text_model.plan.max_model_len - prompt.num_tokens, ignore_eos=True)

    async def overfill():
        streams = [engine.stream(prompt, params, f"r{i}") for i in range(3)]
        first = [asyncio.ensure_future(anext(s)) for s in streams[:2]]
        await asyncio.sleep(0)  # both submitted before the third arrives
        with pytest.raises(Overloaded) as refused:
            await anext(streams[2])
        for task in first:
            task.cancel()
        await asyncio.gather(*first, return_exceptions=True)
        for s in streams[:2]:
            await s.aclose()
        return refused.value

    try:
        refused = asyncio.run(overfill())
    finally:
        engine.close()
    assert refused.status == 429 and refused.headers()["Retry-After"] == "1"


def test_scheduler_metrics_move_with_requests(text_engine) -> None:
    names = (
        "prompt_tokens_total",
        "generation_tokens_total",
        "time_to_first_token_seconds_count",
        "inter_token_latency_seconds_count",
        "engine_step_seconds_count",
        "engine_step_seconds_sum",
        "engine_step_host_seconds_sum",
    )
    before = {n: metric(n) for n in names}
    finished = metric("request_success_total", finished_reason="length")
    prompt = prompts(text_engine)[0]
    tokens, _, reason = alone(text_engine, [(prompt, SamplingParams(max_tokens=5, ignore_eos=True))])[0]
    moved = {n: metric(n) - before[n] for n in names}
    assert reason == "length" and len(tokens) == 5
    assert moved["prompt_tokens_total"] == prompt.num_tokens
    assert moved["generation_tokens_total"] == len(tokens)
    assert moved["time_to_first_token_seconds_count"] == 1
    assert moved["inter_token_latency_seconds_count"] == len(tokens) - 1
    assert moved["engine_step_seconds_count"] >= len(tokens) - 1  # a step may prefill and decode; relayed
    assert 0 < moved["engine_step_host_seconds_sum"] < moved["engine_step_seconds_sum"]
    assert metric("request_success_total", finished_reason="length") == finished + 1


def test_scheduler_vision_requests_batch_like_alone(vision_engine) -> None:
    from PIL import Image

    def image(seed: int) -> Image.Image:
        pixels = torch.randint(
            0, 256, (40, 48, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
        )
        return Image.fromarray(pixels.numpy())

    chats = [
        [ChatMessage(role="user", text="What is this?", images=(image(1),))],
        [ChatMessage(role="user", text="And this one, in detail?", images=(image(2),))],
        [ChatMessage(role="user", text="No picture this time.")],
    ]
    pairs = [
        (vision_engine.render_chat(c), SamplingParams(max_tokens=10 + 3 * i, ignore_eos=True))
        for i, c in enumerate(chats)
    ]
    assert vision_engine.info.kv_pool_tokens is not None  # tiny-llava's architecture batches image prompts
    assert together(vision_engine, pairs) == alone(vision_engine, pairs)


def test_scheduler_close_ends_the_loop_on_its_thread(text_model) -> None:
    engine = InProcessEngine(text_model)  # its own loop thread, the same weights
    assert engine.scheduler.is_alive
    engine.close()  # waits (bounded) for the loop
    assert not engine.scheduler.is_alive


@pytest.mark.parametrize("budget", [512, 16], ids=["one-chunk", "chunked"])
def test_scheduler_choices_prefill_their_prompt_once(text_model, budget) -> None:
    """n choices of one prompt: one prefill computes it (in chunks when it is long), every choice
    decodes from its KV and equals a request run alone with that choice's parameters."""
    limits = ServingLimits(max_prefill_tokens=budget, prefix_caching=False)  # count this prefill alone
    engine = InProcessEngine(text_model, limits)
    prompt = prompts(engine)[1]
    choices = [
        SamplingParams(max_tokens=9, ignore_eos=True),
        *(SamplingParams(max_tokens=9, temperature=1.0, seed=40 + i, ignore_eos=True) for i in range(3)),
    ]
    runner = engine.runner
    computed: list[int] = []
    prefill = runner.prefill

    def counting(chunks):
        computed.extend(len(chunk.token_ids) for chunk in chunks)
        return prefill(chunks)

    async def run():
        streams = engine.stream_choices(prompt, choices, "choices")
        return await asyncio.gather(*(_read(s) for s in streams))

    try:
        expected = alone(engine, [(prompt, params) for params in choices])
        hits = metric("prefix_cache_hits_total")
        runner.prefill = counting
        got = asyncio.run(run())
    finally:
        engine.close()
    assert got == expected
    assert sum(computed) == prompt.num_tokens
    assert len(computed) == -(-prompt.num_tokens // budget)  # the long case really is chunked
    assert metric("prefix_cache_hits_total") - hits == prompt.num_tokens * (len(choices) - 1)


async def _read(stream):
    deltas = [d async for d in stream]
    return [t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas), deltas[-1].finish_reason


def test_scheduler_choices_refused_together(text_model) -> None:
    """Choices queue all or none: n past the free room is one 429 for every choice, nothing runs."""
    engine = InProcessEngine(text_model, ServingLimits(max_num_seqs=2, max_waiting=1))
    prompt = prompts(engine)[0]
    prompted = metric("prompt_tokens_total")

    async def overfill():
        streams = engine.stream_choices(prompt, [SamplingParams(max_tokens=4)] * 4, "too-many")
        return await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)

    try:
        refused = asyncio.run(overfill())
    finally:
        engine.close()
    assert len(refused) == 4 and all(isinstance(r, Overloaded) for r in refused)
    assert metric("prompt_tokens_total") == prompted


def test_scheduler_steps_stay_within_the_token_budget_and_long_prompts_mix_in_chunks(text_model) -> None:
    """A 64-token step budget: two short prompts join and decode while a long one is prefilled a chunk a
    step in the same forwards (mixed steps, its chunks growing in its pool row); no forward computes more
    than 64 tokens, and every request's greedy tokens equal its own alone."""
    budget = 64
    engine = InProcessEngine(text_model, ServingLimits(max_num_batched_tokens=budget, prefix_caching=False))
    runner = engine.runner
    per_forward: list[int] = []
    row_chunks_mixed = []
    mixed, prefill, decode = runner.mixed, runner.prefill, runner.decode

    def counting_mixed(chunks, token_ids):
        per_forward.append(len(token_ids) + sum(len(c.token_ids) for c in chunks))
        row_chunks_mixed.extend(c for c in chunks if c.in_row)
        return mixed(chunks, token_ids)

    def counting_prefill(chunks):
        per_forward.append(sum(len(c.token_ids) for c in chunks))
        return prefill(chunks)

    def counting_decode(token_ids):
        per_forward.append(len(token_ids))
        return decode(token_ids)

    runner.mixed, runner.prefill, runner.decode = counting_mixed, counting_prefill, counting_decode
    short = [engine.encode("Hi there."), engine.encode("Why?")]
    long = engine.encode("the sharded bento serves many GPUs " * 30)
    assert long.num_tokens > 4 * budget
    pairs = [(p, SamplingParams(max_tokens=40, ignore_eos=True)) for p in (*short, long)]
    reference = InProcessEngine(text_model, ServingLimits(max_num_batched_tokens=2048, prefix_caching=False))
    try:
        got = together(engine, pairs)
        expected = alone(reference, pairs)  # every prompt whole, one request at a time
    finally:
        engine.close()
        reference.close()
    assert max(per_forward) <= budget
    assert len(row_chunks_mixed) >= long.num_tokens // budget  # its chunks went beside the decodes
    assert got == expected


def test_scheduler_a_constraint_with_no_producible_token_ends_alone(text_model) -> None:
    """A request whose grammar allows only ids past the model's output width (its tokenizer longer than
    the logits, emulated by narrowing the width the grammars see) ends with a 400 naming its field;
    requests decoding in the same batch go on to the tokens they give alone."""
    import dataclasses

    from shardbento.engine.grammar import Grammars
    from shardbento.errors import InvalidRequest

    loaded = text_model.prompts
    width = len(loaded.tokenizer) - 8
    narrowed = Grammars(loaded.tokenizer, loaded.eos_token_ids, logits_width=width)
    engine = InProcessEngine(
        dataclasses.replace(text_model, prompts=dataclasses.replace(loaded, grammars=narrowed))
    )
    beyond = Constraint("lark", f'start: "a" <[{len(loaded.tokenizer) - 1}]>', param="structured_outputs")
    ps = prompts(engine)
    plain = [(ps[i], SamplingParams(max_tokens=10 + i, ignore_eos=True)) for i in (0, 1)]
    try:
        expected = alone(engine, plain)
        errors = metric("request_success_total", finished_reason="error")

        async def run():
            calls = [collect(engine, p, params) for p, params in plain]
            stuck = collect(engine, ps[2], SamplingParams(max_tokens=10, constraint=beyond))
            return await asyncio.gather(*calls, stuck, return_exceptions=True)

        *answers, failure = asyncio.run(run())
    finally:
        engine.close()
    assert answers == expected
    assert isinstance(failure, InvalidRequest) and failure.param == "structured_outputs"
    assert "after 1 generated tokens" in failure.message
    assert metric("request_success_total", finished_reason="error") == errors + 1
