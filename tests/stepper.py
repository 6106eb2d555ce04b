"""The real Scheduler and ModelRunner over a loaded tiny model, stepped one step at a time by the test
(no engine thread): for tests that need exactly which requests share a step, and a step that fails
handled as the engine loop handles it."""

from __future__ import annotations

from typing import Any

import torch

from shardbento.catalog import ServingLimits
from shardbento.engine.base import SamplingParams
from shardbento.engine.batch.kvslots import PREFIX_BLOCK
from shardbento.engine.batch.runner import ModelRunner
from shardbento.engine.batch.scheduler import Scheduler
from shardbento.engine.core.lead import SequenceFactory
from shardbento.engine.hf.loading import LoadedModel
from shardbento.metrics import RequestMetrics


class Collected:
    """A sequence's channel: what the scheduler delivered to it, in order."""

    def __init__(self) -> None:
        self.items: list[Any] = []


class Stepper:
    def __init__(self, loaded: LoadedModel, max_len: int = 1024, **limits: Any) -> None:
        self.loaded = loaded
        serving = ServingLimits(**limits)
        self.runner = ModelRunner(loaded.model, serving.max_num_seqs, max_len)
        with torch.inference_mode():
            self.runner.allocate_pool(serving)
        self.factory = SequenceFactory(loaded.prompts)
        metrics = RequestMetrics(loaded.prompts.spec.name)
        self.scheduler = Scheduler(self.runner, serving, metrics, self._deliver, False)
        self.errors: list[BaseException] = []
        self._submitted = 0

    @staticmethod
    def _deliver(items: list[tuple[Any, Any]]) -> list[Any]:
        for channel, item in items:
            channel.items.append(item)
        return []

    def submit(self, *prompts: list[int], max_tokens: int = 4) -> list[Any]:
        """Queue token-id prompts together (greedy, `max_tokens` each): one step sees them all."""
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        seqs = []
        for ids in prompts:
            self._submitted += 1
            prompt = self.loaded.prompts.encode(list(ids))
            seqs.append(self.factory.sequence(f"s{self._submitted}", prompt, params, Collected()))
        self.scheduler.submit(*seqs)
        return seqs

    def step(self) -> None:
        """One engine step; a step that raises fails what it computed, as the engine loop does."""
        try:
            with torch.inference_mode():
                self.scheduler._step()
        except Exception as exc:  # noqa: BLE001 - the engine loop's handling, kept for the test to see
            self.errors.append(exc)
            self.scheduler._fail_all(exc)
        self.scheduler._flush()

    def finish(self, seqs: list[Any], steps: int = 500) -> list[Any]:
        """Step until the sequences finish (at most `steps`): each one's token ids, or its error."""
        for _ in range(steps):
            if all(seq.output.finished for seq in seqs):
                break
            self.step()
        return [answer(seq) for seq in seqs]

    def run(self, *prompts: list[int], max_tokens: int = 4, steps: int = 500) -> list[Any]:
        return self.finish(self.submit(*prompts, max_tokens=max_tokens), steps)

    def rows_over_cached_blocks(self) -> bool:
        """Whether the live rows, as laid out now, reach into the cached prefix blocks at the pool's tail."""
        kv = self.runner.kv
        rows = kv.rows_taken(sum(1 for n in kv.lengths if n))
        return rows * kv.width > kv.pool_tokens - kv.prefix_blocks * PREFIX_BLOCK


def answer(seq: Any) -> Any:
    out = []
    for item in seq.channel.items:
        if isinstance(item, BaseException):
            return ("error", repr(item))
        out.extend(item.token_ids)
    return out
