"""The transformers engine out of the HTTP process: rank processes hold the model (one, or one per
tensor-parallel rank); this process holds the Preprocessor and routes requests and Deltas."""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from shardbento.catalog import ModelSpec
from shardbento.engine.adapters import AdapterSet
from shardbento.engine.base import Constraint, Delta, EngineInfo, Prompt, SamplingParams
from shardbento.engine.core.affinity import child_environment, rank_binding, usable_cpus
from shardbento.engine.core.client import StreamRouter
from shardbento.engine.core.messages import (
    LoadAdapter,
    RankChannels,
    RankConfig,
    RankLoadFailed,
    RankReady,
    Stop,
    UnloadAdapter,
)
from shardbento.engine.core.rank import run_rank
from shardbento.engine.hf.preprocess import Preprocessor, PreprocessorPrompts, load_preprocessor
from shardbento.errors import InvalidRequest, NotReady
from shardbento.metrics import RequestMetrics
from shardbento.plan.preflight import run_preflight
from shardbento.plan.sharding import Plan
from shardbento.plan.source import checkpoint_path
from shardbento.settings import Settings

logger = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 900.0
POLL_S = 0.1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ProcessEngine(PreprocessorPrompts):
    """The transformers engine: `plan.world_size` spawned rank processes (a world of one for one device
    or a layer split), rank 0 running the continuous batch (or one-at-a-time generate() for models whose
    decode cannot batch). This process renders and tokenizes prompts and never holds the weights, so
    the forwards never share its GIL with the event loop. A watchdog thread marks the engine unready and
    not alive the moment any rank exits, and every open stream ends with a 503.
    """

    def __init__(
        self,
        spec: ModelSpec,
        prompts: Preprocessor,
        ranks: list[Any],
        channels: RankChannels,
        ready: RankReady,
    ) -> None:
        self.spec = spec
        self._prompts = prompts
        self._ranks = ranks
        self._channels = channels
        self._router = StreamRouter(
            channels.requests, channels.results, RequestMetrics(spec.name, spec.max_loras), self._why_down
        )
        router = self._router
        self.adapters = AdapterSet(
            spec,
            lambda name, path: router.control(lambda ticket: LoadAdapter(ticket, name, path)),
            lambda name: router.control(lambda ticket: UnloadAdapter(ticket, name)),
        )
        self._closing = False
        self.failure: str | None = None
        self.info = EngineInfo(
            model=spec.name,
            kind=spec.kind,
            max_model_len=spec.max_model_len,
            engine="transformers",
            parallel=ready.parallel,
            devices=ready.devices,
            vocab_size=prompts.vocab_size,
            tool_parser=prompts.tool_parser,
            reasoning_parser=prompts.reasoning_parser,
            kv_pool_tokens=ready.kv_pool_tokens,
        )
        threading.Thread(target=self._watch, name="shardbento-watchdog", daemon=True).start()

    @classmethod
    def load(
        cls, spec: ModelSpec, plan: Plan | None = None, settings: Settings | None = None
    ) -> ProcessEngine:
        """Spawn the ranks (by default preflight's plan) and wait until each holds its part of the model."""
        import torch.multiprocessing as mp

        plan = plan or run_preflight(spec)
        settings = settings or Settings.from_env()
        path = checkpoint_path(spec)
        prompts = load_preprocessor(spec, path)
        context = mp.get_context("spawn")
        world = plan.world_size if plan.mode == "tensor" else 1
        channels = RankChannels(
            requests=context.Queue(),
            results=context.Queue(),
            status=context.Queue(),
            control=tuple(context.SimpleQueue() for _ in range(world - 1)),
        )
        port = free_port()
        ranks, cpus = [], usable_cpus()
        for rank in range(world):
            config = RankConfig(
                rank,
                world,
                port,
                spec,
                plan,
                path,
                settings.collective_timeout_s,
                settings.engine_fault,
                settings.force_generate,
            )
            process = context.Process(
                target=run_rank, args=(config, channels), name=f"shardbento-rank{rank}", daemon=True
            )
            binding = rank_binding(plan.device, world, rank, cpus, os.environ)
            with child_environment(binding):
                process.start()
            ranks.append(process)
        ready = _wait_ready(ranks, channels.status)
        logger.info("model %s: engine ready on %s (%s)", spec.name, ready.devices, ready.parallel)
        return cls(spec, prompts, ranks, channels, ready)

    def check_constraint(self, constraint: Constraint) -> None:
        if len(self._ranks) > 1 and self.info.kv_pool_tokens is None:
            raise InvalidRequest(  # generate() on every rank: only rank 0 has the grammar to follow
                f"{constraint.param}: constrained output is not available for {self.spec.name!r} on "
                "tensor-parallel ranks (it runs one request at a time); serve it on one process or with "
                "parallel: layers",
                param=constraint.param,
            )
        super().check_constraint(constraint)

    def is_ready(self) -> bool:
        return not self._closing and self.failure is None

    def is_alive(self) -> bool:
        return self.failure is None

    def _dead_rank(self) -> str | None:
        for rank, process in enumerate(self._ranks):
            if not process.is_alive():
                return f"engine rank {rank} exited (code {process.exitcode})"
        return None

    def _why_down(self) -> str | None:
        """The 503 message once a rank is gone (a step that failed for that reason is not the request's fault)."""
        dead = self.failure or self._dead_rank()
        return f"model {self.spec.name!r} stopped serving: {dead}" if dead else None

    def _watch(self) -> None:
        while not self._closing:
            failure = self._dead_rank()
            if failure is not None and not self._closing:
                self.failure = failure
                logger.error("model %s: %s; the engine stops serving", self.spec.name, failure)
                self._router.fail(f"model {self.spec.name!r} stopped serving: {failure}")
                self._terminate()
                return
            time.sleep(POLL_S)

    def _terminate(self) -> None:
        for process in self._ranks:
            if process.is_alive():
                process.terminate()
        for process in self._ranks:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()

    def close(self) -> None:
        """Ask the ranks to stop (they meet at a barrier, then leave the group); force them after a wait."""
        if self._closing:
            return
        self._closing = True
        self._router.fail(f"model {self.spec.name!r} is not serving: shutting down")
        if self.failure is None:
            self._channels.requests.put(Stop())
            for process in self._ranks:
                process.join(timeout=30)
        self._terminate()

    async def stream(self, prompt: Prompt, params: SamplingParams, request_id: str) -> AsyncIterator[Delta]:
        async for delta in self.stream_choices(prompt, [params], request_id)[0]:
            yield delta

    def stream_choices(
        self, prompt: Prompt, params: list[SamplingParams], request_id: str
    ) -> list[AsyncIterator[Delta]]:
        if not self.is_ready():
            raise NotReady(f"model {self.spec.name!r} is not serving: {self.failure or 'shutting down'}")
        if not prompt.num_images:  # rank 0 needs the ids only: tensors would cross in shared memory
            prompt = dataclasses.replace(prompt, inputs=None)
        return self._router.stream_choices(prompt, params, request_id)


def _wait_ready(ranks: list[Any], status: Any) -> RankReady:
    """Wait until every rank has loaded its part (rank 0's RankReady is returned); any error or exit
    fails startup with its reason."""
    ready: dict[int, RankReady] = {}
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while len(ready) < len(ranks):
        try:
            message = status.get(timeout=1.0)
        except queue.Empty:
            dead = [i for i, p in enumerate(ranks) if not p.is_alive()]
            if dead or time.monotonic() > deadline:
                for process in ranks:
                    process.kill()
                why = f"rank {dead[0]} exited (code {ranks[dead[0]].exitcode})" if dead else "timed out"
                raise RuntimeError(f"engine startup failed: {why}") from None
            continue
        if isinstance(message, RankLoadFailed):
            for process in ranks:
                process.kill()
            raise RuntimeError(f"engine rank {message.rank} failed to load:\n{message.traceback}")
        ready[message.rank] = message
    first = ready[0]
    if len(ranks) > 1:
        devices = tuple(f"rank{r}:{ready[r].device}" for r in sorted(ready))
        return RankReady(0, first.device, first.kv_pool_tokens, devices, first.parallel)
    return first
