"""The transformers engine: text and LLaVA requests batch in the scheduler; other vision uses generate()."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from shardbento.catalog import ModelSpec
from shardbento.engine.base import (
    Delta,
    DeltaChannel,
    EngineInfo,
    Prompt,
    SamplingParams,
    StartTogether,
    choice_ids,
    separate_choices,
)
from shardbento.engine.batch.runner import ModelRunner
from shardbento.engine.batch.sampler import RequestSampler, forced_generate_kwargs
from shardbento.engine.batch.scheduler import Scheduler, Sequence
from shardbento.engine.hf.loading import LoadedModel, load_model
from shardbento.engine.hf.preprocess import PreprocessorPrompts
from shardbento.engine.output import OutputStream
from shardbento.metrics import RequestMetrics
from shardbento.plan.preflight import run_preflight
from shardbento.plan.sharding import Plan

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Job:
    """A request's state shared between the event loop and the generation thread."""

    prompt: Prompt
    params: SamplingParams
    output: OutputStream
    emit: Any
    cancelled: threading.Event = field(default_factory=threading.Event)


class _JobStreamer:
    """generate()'s streamer: turns each new token into a Delta for the event loop."""

    def __init__(self, job: _Job, sampler: RequestSampler) -> None:
        self._job = job
        self._sampler = sampler
        self._saw_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._saw_prompt:  # generate() hands the prompt to the streamer first
            self._saw_prompt = True
            return
        if self._job.output.finished:
            return
        token_id = int(value.reshape(-1)[0])
        self._job.emit(self._job.output.push(token_id, self._sampler.pop_logprob()))

    def end(self) -> None:
        if not self._job.output.finished:  # generate() stopped on its own (cancel): close the stream
            self._job.output.finished = True
            self._job.emit(Delta(text="", finish_reason="stop"))


class _StopWhenDone:
    """Stops generate() once the output is finished (stop string) or the client went away."""

    def __init__(self, job: _Job) -> None:
        self._job = job

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = self._job.output.finished or self._job.cancelled.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


# Vision architectures whose decode after an image prefill is plain text decoding (one position per
# token, no cross-attention state), so image requests can join the continuous batch. Others (Mllama's
# cross-attention, Qwen2-VL's multimodal rotary positions) keep the one-at-a-time generate() path.
# GLM-4V's image positions share one rotary position: its prefill reports the offset and the KV slot
# keeps it (kvslots.position_offsets), so its decode batches too.
BATCHED_VISION_TYPES = frozenset({"llava", "shardbento_glm4v"})
# Vision models whose rotary positions are the cache index: a cached prefix with their images is valid
# for any later prompt with the same images (GLM-4V's image positions are not).
PREFIX_CACHED_VISION_TYPES = frozenset({"llava"})


class HFEngine(PreprocessorPrompts):
    """Requests join one continuous batch (the Scheduler's loop): every text model, and vision
    models of BATCHED_VISION_TYPES (their image prompts are prefilled alone, then decode in the
    batch). Other vision models run one request at a time through generate(). Either way every
    forward runs on the one engine thread that loaded the model.
    """

    def __init__(
        self, spec: ModelSpec, loaded: LoadedModel, executor: ThreadPoolExecutor | None = None
    ) -> None:
        self.spec = spec
        self._loaded = loaded
        self._prompts = loaded.prompts
        self._executor = executor or _engine_thread()
        self._closed = False
        self._metrics = RequestMetrics(spec.name)
        self._scheduler: Scheduler | None = None
        self._batches_images = getattr(loaded.model.config, "model_type", None) in BATCHED_VISION_TYPES
        self._caches_image_prefixes = loaded.model.config.model_type in PREFIX_CACHED_VISION_TYPES
        pool_tokens = None
        if spec.kind == "text" or self._batches_images:
            runner = ModelRunner(loaded.model, loaded.plan.max_num_seqs, loaded.plan.max_model_len)
            with torch.inference_mode():
                pool_tokens = runner.allocate_pool(spec.limits)
            logger.info("model %s: KV pool of %d tokens (%s)", spec.name, pool_tokens, runner.pool_source)
            self._scheduler = Scheduler(runner, spec.limits, self._metrics, start=False)
            self._executor.submit(self._scheduler.run)
        self.info = EngineInfo(
            model=spec.name,
            kind=spec.kind,
            max_model_len=spec.max_model_len,
            engine="transformers",
            parallel=loaded.parallel,
            devices=loaded.devices,
            vocab_size=loaded.prompts.vocab_size,
            tool_parser=loaded.prompts.tool_parser,
            reasoning_parser=loaded.prompts.reasoning_parser,
            kv_pool_tokens=pool_tokens,
        )

    @classmethod
    def load(cls, spec: ModelSpec, plan: Plan | None = None) -> HFEngine:
        """Load as `plan` (by default preflight's) says, on the engine's own thread, which then runs every
        forward (see Scheduler.run for why one thread must own the CPU's OpenMP pool)."""
        plan = plan or run_preflight(spec)
        executor = _engine_thread()
        try:
            return executor.submit(lambda: cls(spec, load_model(spec, plan), executor)).result()
        except BaseException:
            executor.shutdown(wait=False)
            raise

    @property
    def model(self) -> Any:
        return self._loaded.model

    def is_ready(self) -> bool:
        return not self._closed and (self._scheduler is None or self._scheduler.is_alive)

    def close(self) -> None:
        self._closed = True
        if self._scheduler is not None:
            self._scheduler.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def stream(self, prompt: Prompt, params: SamplingParams, request_id: str) -> AsyncIterator[Delta]:
        if self._batches(prompt):
            async for delta in self.stream_choices(prompt, [params], request_id)[0]:
                yield delta
            return
        channel = DeltaChannel()
        output = OutputStream(self.tokenizer, prompt.token_ids, params, self._prompts.eos_token_ids)
        job = _Job(prompt=prompt, params=params, output=output, emit=channel.emit)
        asyncio.get_running_loop().run_in_executor(self._executor, self._run, job, request_id)
        try:
            async for delta in channel.deltas():
                yield delta
        finally:
            job.cancelled.set()

    def stream_choices(
        self, prompt: Prompt, params: list[SamplingParams], request_id: str
    ) -> list[AsyncIterator[Delta]]:
        if not self._batches(prompt):
            return separate_choices(self, prompt, params, request_id)

        def start() -> list[Sequence]:
            seqs = [
                self._sequence(prompt, p, rid)
                for p, rid in zip(params, choice_ids(request_id, len(params)), strict=True)
            ]
            self._scheduler.submit(*seqs)
            return seqs

        together = StartTogether(start)
        return [self._follow(together, i) for i in range(len(params))]

    def _batches(self, prompt: Prompt) -> bool:
        return self._scheduler is not None and (prompt.num_images == 0 or self._batches_images)

    def _sequence(self, prompt: Prompt, params: SamplingParams, request_id: str) -> Sequence:
        output = OutputStream(self.tokenizer, prompt.token_ids, params, self._prompts.eos_token_ids)
        seq = Sequence(
            request_id, list(prompt.token_ids), self._prompts.sampler(params), output, DeltaChannel()
        )
        if prompt.num_images:
            seq.inputs = dict(prompt.inputs)
            image_token = getattr(self.model.config, "image_token_id", None)
            if self._caches_image_prefixes and image_token in prompt.token_ids:
                seq.prefix_salt = prompt.images_digest
                seq.image_end = len(prompt.token_ids) - prompt.token_ids[::-1].index(image_token)
        return seq

    async def _follow(self, together: StartTogether[Sequence], index: int) -> AsyncIterator[Delta]:
        seq = together.get(index)
        try:
            async for delta in seq.channel.deltas():
                yield delta
        finally:
            if not seq.output.finished:
                seq.cancelled = True  # leaves the batch at the next step
                self._scheduler.wake()

    def _run(self, job: _Job, request_id: str) -> None:
        if job.cancelled.is_set():
            return
        try:
            self._generate(job)
        except Exception as exc:  # noqa: BLE001 - the request fails, the engine keeps serving
            logger.exception("request %s: generation failed", request_id)
            job.emit(exc)

    def _generate(self, job: _Job) -> None:
        params = job.params
        device = self._loaded.input_device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in job.prompt.inputs.items()}
        sampler = self._prompts.sampler(params)
        with torch.inference_mode():
            self.model.generate(
                **inputs,
                **forced_generate_kwargs(
                    sampler, params, self._prompts.eos_token_ids, self._prompts.pad_token_id
                ),
                stopping_criteria=[_StopWhenDone(job)],
                streamer=_JobStreamer(job, sampler),
            )


def _engine_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardbento-engine")
