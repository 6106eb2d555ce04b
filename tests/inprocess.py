"""Rank 0's loop in the test's own process: the real Scheduler over the real ModelRunner and a loaded
tiny model, for tests that look inside the scheduler (its runner, its steps). What the process boundary
adds (messages, the router, a dying rank) is tested against the real engine process."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Any

import torch

from shardbento.catalog import ServingLimits
from shardbento.engine.base import Delta, DeltaChannel, Prompt, SamplingParams, StartTogether, choice_ids
from shardbento.engine.batch.adapters import AdapterSlots
from shardbento.engine.batch.runner import ModelRunner
from shardbento.engine.batch.scheduler import Scheduler
from shardbento.engine.core.adapters import AdapterRegistry, register_catalog
from shardbento.engine.core.lead import SequenceFactory
from shardbento.engine.core.rank import PREFIX_CACHED_VISION_TYPES
from shardbento.engine.hf.loading import LoadedModel
from shardbento.metrics import RequestMetrics


class InProcessEngine:
    """A Scheduler started on its own thread over `loaded`'s model, streaming Deltas like an engine."""

    def __init__(self, loaded: LoadedModel, limits: ServingLimits | None = None):
        limits = limits or loaded.prompts.spec.limits
        self.loaded = loaded
        self.prompts = loaded.prompts
        spec = loaded.prompts.spec
        self.runner = ModelRunner(
            loaded.model, limits.max_num_seqs, loaded.plan.max_model_len, max_images=spec.max_images
        )
        with torch.inference_mode():
            self.kv_pool_tokens = self.runner.allocate_pool(limits)
        config = loaded.model.config
        spec = loaded.prompts.spec
        registry = AdapterRegistry(register_catalog(self.runner, spec)) if spec.lora_adapters else None
        self.make_sequence = SequenceFactory(
            loaded.prompts,
            image_token_id=getattr(config, "image_token_id", None),
            caches_image_prefixes=getattr(config, "model_type", None) in PREFIX_CACHED_VISION_TYPES,
            adapters=registry,
        )
        self.metrics = RequestMetrics(spec.name)
        self.scheduler = Scheduler(self.runner, limits, self.metrics, start=False)
        if registry is not None:  # as rank 0 runs it (engine/core/rank.py)
            self.scheduler.adapters = AdapterSlots(
                self.runner, spec.max_loras, registry.name_of, self.metrics
            )
        threading.Thread(target=self.scheduler.run, name="inprocess-scheduler", daemon=True).start()

    @property
    def model(self) -> Any:
        return self.loaded.model

    def render_chat(self, messages: list, template_kwargs: dict | None = None) -> Prompt:
        return self.prompts.render_chat(messages, template_kwargs)

    def encode(self, text: str | list[int]) -> Prompt:
        return self.prompts.encode(text)

    async def stream(
        self, prompt: Prompt, params: SamplingParams, request_id: str = "test"
    ) -> AsyncIterator[Delta]:
        async for delta in self.stream_choices(prompt, [params], request_id)[0]:
            yield delta

    def stream_choices(
        self, prompt: Prompt, params: list[SamplingParams], request_id: str
    ) -> list[AsyncIterator[Delta]]:
        """One stream per choice, queued together when the first starts (as rank 0 does)."""

        def start() -> list[Any]:
            ids = choice_ids(request_id, len(params))
            seqs = [
                self.make_sequence.sequence(rid, prompt, p, DeltaChannel())
                for rid, p in zip(ids, params, strict=True)
            ]
            self.scheduler.submit(*seqs)
            return seqs

        together = StartTogether(start)
        return [self._follow(together, i) for i in range(len(params))]

    async def _follow(self, together: StartTogether[Any], index: int) -> AsyncIterator[Delta]:
        seq = together.get(index)
        try:
            async for delta in seq.channel.deltas():
                yield delta
        finally:
            if not seq.output.finished:
                seq.cancelled = True
                self.scheduler.wake()

    def close(self) -> None:
        self.scheduler.close()
