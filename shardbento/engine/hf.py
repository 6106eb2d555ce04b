"""The transformers engine: one model (single device or accelerate layer split) driven by generate()."""

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
from shardbento.engine.base import ChatMessage, Delta, EngineInfo, Prompt, SamplingParams
from shardbento.engine.loading import LoadedModel, load_model
from shardbento.engine.sampler import RequestSampler
from shardbento.textstream import OutputStream

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


class HFEngine:
    """Runs requests one at a time on a dedicated thread so the event loop never blocks.

    One thread (not a pool) because a model's forward pass is not safe to run twice at once
    and the GPU would serialise it anyway; concurrency comes from the scheduler, not threads.
    """

    def __init__(self, spec: ModelSpec, loaded: LoadedModel) -> None:
        self.spec = spec
        self._loaded = loaded
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardbento-generate")
        self._closed = False
        self.info = EngineInfo(
            model=spec.name,
            kind=spec.kind,
            max_model_len=spec.max_model_len,
            engine="transformers",
            parallel=loaded.parallel,
            devices=loaded.devices,
        )

    @classmethod
    def load(cls, spec: ModelSpec) -> HFEngine:
        return cls(spec, load_model(spec))

    @property
    def tokenizer(self) -> Any:
        return self._loaded.tokenizer

    @property
    def model(self) -> Any:
        return self._loaded.model

    def render_chat(self, messages: list[ChatMessage]) -> Prompt:
        return self._loaded.render_chat(messages)

    def encode(self, text: str | list[int]) -> Prompt:
        return self._loaded.encode(text)

    def is_ready(self) -> bool:
        return not self._closed

    def close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def stream(self, prompt: Prompt, params: SamplingParams, request_id: str) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()

        def emit(item: Delta | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        output = OutputStream(self.tokenizer, prompt.token_ids, params, self._loaded.eos_token_ids)
        job = _Job(prompt=prompt, params=params, output=output, emit=emit)
        loop.run_in_executor(self._executor, self._run, job, request_id)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            job.cancelled.set()

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
        sampler = RequestSampler(params, eos_ids=self._loaded.eos_token_ids, decode=self._loaded.token_text)
        with torch.inference_mode():
            self.model.generate(
                **inputs,
                max_new_tokens=params.max_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                num_beams=1,
                repetition_penalty=None,
                eos_token_id=None if params.ignore_eos else sorted(self._loaded.eos_token_ids),
                pad_token_id=self._loaded.pad_token_id,
                logits_processor=[sampler],
                stopping_criteria=[_StopWhenDone(job)],
                streamer=_JobStreamer(job, sampler),
            )
