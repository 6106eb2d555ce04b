"""Native tensor parallelism: one spawned process per rank (GPU, or CPU over gloo); rank 0 drives."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shardbento.catalog import ModelSpec
from shardbento.engine.base import (
    Constraint,
    Delta,
    DeltaChannel,
    EngineInfo,
    Prompt,
    SamplingParams,
    separate_choices,
)
from shardbento.engine.hf.loading import resolve_dtype
from shardbento.engine.hf.preprocess import Preprocessor, PreprocessorPrompts, load_preprocessor
from shardbento.engine.output import OutputStream
from shardbento.engine.tp.client import BatchClient
from shardbento.engine.tp.messages import (
    GenerateCall,
    GeneratedToken,
    RankChannels,
    RankConfig,
    RankLoadFailed,
    Stop,
)
from shardbento.engine.tp.rank import run_rank
from shardbento.errors import GenerationFailed, InvalidRequest, NotReady
from shardbento.metrics import RequestMetrics
from shardbento.plan.preflight import run_preflight
from shardbento.plan.sharding import Plan
from shardbento.plan.source import checkpoint_path

logger = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 900.0
POLL_S = 0.1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TPEngine(PreprocessorPrompts):
    """Tensor-parallel engine: the service process tokenizes; ranks hold the shards.

    Text requests join one continuous batch that rank 0 schedules (tp_scheduler; this process routes
    its Deltas through a BatchClient). Vision requests run one at a time through generate() on every
    rank, driven from one thread here (every step is a collective across all ranks). A watchdog
    thread marks the engine unready the moment any rank exits, so requests fail fast.
    """

    def __init__(
        self,
        spec: ModelSpec,
        prompts: Preprocessor,
        ranks: list[Any],
        channels: RankChannels,
        devices: tuple[str, ...],
        kv_pool_tokens: int | None = None,
    ) -> None:
        self.spec = spec
        self._prompts = prompts
        self._ranks = ranks
        self._requests = channels.requests
        self._results = channels.results
        self._cancel = channels.cancel
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardbento-tp")
        self._batch: BatchClient | None = None
        if spec.kind == "text":
            metrics = RequestMetrics(spec.name)
            self._batch = BatchClient(channels.requests, channels.results, metrics, self._why_down)
        self._closing = False
        self.failure: str | None = None
        self.info = EngineInfo(
            model=spec.name,
            kind=spec.kind,
            max_model_len=spec.max_model_len,
            engine="transformers",
            parallel=f"tensor x{len(ranks)}",
            devices=devices,
            vocab_size=prompts.vocab_size,
            tool_parser=prompts.tool_parser,
            reasoning_parser=prompts.reasoning_parser,
            kv_pool_tokens=kv_pool_tokens,
        )
        threading.Thread(target=self._watch, name="shardbento-tp-watchdog", daemon=True).start()

    def check_constraint(self, constraint: Constraint) -> None:
        if self._batch is None:  # generate() on every rank: only rank 0 has a tokenizer to constrain with
            raise InvalidRequest(
                f"{constraint.param}: constrained output is not available for tensor-parallel vision "
                f"models; serve {self.spec.name!r} on one process or with parallel: layers",
                param=constraint.param,
            )
        super().check_constraint(constraint)

    @classmethod
    def load(cls, spec: ModelSpec, plan: Plan | None = None) -> TPEngine:
        """Spawn `plan.world_size` ranks (by default preflight's plan) and wait until each holds its shard."""
        import torch.multiprocessing as mp

        plan = plan or run_preflight(spec)
        path = checkpoint_path(spec)
        prompts = load_preprocessor(spec, path)
        context = mp.get_context("spawn")
        channels = RankChannels(
            requests=context.Queue(),
            results=context.Queue(),
            status=context.Queue(),
            cancel=context.Event(),
            control=tuple(context.SimpleQueue() for _ in range(plan.world_size - 1)),
        )
        port = free_port()
        ranks = []
        for rank in range(plan.world_size):
            config = _rank_config(spec, plan, prompts, path, rank, port)
            process = context.Process(
                target=run_rank, args=(config, channels), name=f"shardbento-tp-rank{rank}", daemon=True
            )
            process.start()
            ranks.append(process)
        devices, pool = _wait_ready(ranks, channels.status)
        logger.info("model %s: %d tensor-parallel ranks ready on %s", spec.name, len(ranks), devices)
        return cls(spec, prompts, ranks, channels, devices, pool)

    def is_ready(self) -> bool:
        return not self._closing and self.failure is None

    def _dead_rank(self) -> str | None:
        for rank, process in enumerate(self._ranks):
            if not process.is_alive():
                return f"tensor-parallel rank {rank} exited (code {process.exitcode})"
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
                if self._batch is not None:
                    self._batch.fail(f"model {self.spec.name!r} stopped serving: {failure}")
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
        self._cancel.set()
        if self._batch is not None:
            self._batch.fail(f"model {self.spec.name!r} is not serving: shutting down")
        if self.failure is None:
            self._requests.put(Stop())
            for process in self._ranks:
                process.join(timeout=30)
        self._terminate()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def stream(self, prompt: Prompt, params: SamplingParams, request_id: str) -> AsyncIterator[Delta]:
        if not self.is_ready():
            raise NotReady(f"model {self.spec.name!r} is not serving: {self.failure or 'shutting down'}")
        if self._batch is not None:
            async for delta in self._batch.stream_choices(prompt.token_ids, [params], request_id)[0]:
                yield delta
            return
        if not params.greedy and params.seed is None:  # one seed for all ranks, so their samples agree
            params = dataclasses.replace(params, seed=secrets.randbits(63))
        channel = DeltaChannel()
        cancelled = threading.Event()
        output = OutputStream(self._prompts.tokenizer, prompt.token_ids, params, self._prompts.eos_token_ids)
        call = GenerateCall(request_id=request_id, inputs=dict(prompt.inputs), params=params)
        asyncio.get_running_loop().run_in_executor(
            self._executor, self._run, call, output, channel.emit, cancelled
        )
        try:
            async for delta in channel.deltas():
                yield delta
        finally:
            cancelled.set()

    def stream_choices(
        self, prompt: Prompt, params: list[SamplingParams], request_id: str
    ) -> list[AsyncIterator[Delta]]:
        if self._batch is None or not self.is_ready():
            return separate_choices(self, prompt, params, request_id)
        return self._batch.stream_choices(prompt.token_ids, params, request_id)

    def _run(self, call: GenerateCall, output: OutputStream, emit: Any, cancelled: threading.Event) -> None:
        if cancelled.is_set():
            return
        if not self.is_ready():
            emit(NotReady(f"model {self.spec.name!r} is not serving: {self.failure or 'shutting down'}"))
            return
        self._cancel.clear()
        self._requests.put(call)
        try:
            self._collect(call.request_id, output, emit, cancelled)
        except BaseException as exc:  # noqa: BLE001 - handed to the request's coroutine
            emit(exc)

    def _collect(self, request_id: str, output: OutputStream, emit: Any, cancelled: threading.Event) -> None:
        """Turn rank 0's token ids into Deltas until it reports the end; fail fast if a rank dies."""
        while True:
            if output.finished or cancelled.is_set():
                self._cancel.set()  # rank 0 broadcasts the stop at the next step
            try:
                message = self._results.get(timeout=POLL_S)
            except queue.Empty:
                if self.failure is not None:
                    raise NotReady(f"model {self.spec.name!r} stopped serving: {self.failure}") from None
                continue
            if message.request_id != request_id:
                continue  # a leftover from a request whose client went away
            if isinstance(message, GeneratedToken):
                if not output.finished:
                    emit(output.push(message.token_id, message.logprob))
                continue
            if message.error is not None:
                raise GenerationFailed(f"generation failed: {message.error}")
            if not output.finished:
                output.finished = True
                emit(Delta(text="", finish_reason="stop"))
            return


def _rank_config(
    spec: ModelSpec, plan: Plan, prompts: Preprocessor, path: str, rank: int, port: int
) -> RankConfig:
    return RankConfig(
        rank=rank,
        world_size=plan.world_size,
        master_port=port,
        device=plan.device,
        model_path=path,
        dtype=str(resolve_dtype(spec)).removeprefix("torch."),
        kind=spec.kind,
        trust_remote_code=spec.trust_remote_code,
        cpu_kernels=spec.cpu_kernels,
        eos_token_ids=tuple(sorted(prompts.eos_token_ids)),
        pad_token_id=prompts.pad_token_id,
        limits=spec.limits,
        max_num_seqs=plan.max_num_seqs,
        max_model_len=plan.max_model_len,
    )


def _wait_ready(ranks: list[Any], status: Any) -> tuple[tuple[str, ...], int | None]:
    """Wait until every rank has loaded its shard (devices, and rank 0's KV pool in tokens); any error
    or exit fails startup with its reason."""
    devices: dict[int, str] = {}
    pool: int | None = None
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while len(devices) < len(ranks):
        try:
            message = status.get(timeout=1.0)
        except queue.Empty:
            dead = [i for i, p in enumerate(ranks) if not p.is_alive()]
            if dead or time.monotonic() > deadline:
                for process in ranks:
                    process.kill()
                why = f"rank {dead[0]} exited (code {ranks[dead[0]].exitcode})" if dead else "timed out"
                raise RuntimeError(f"tensor-parallel startup failed: {why}") from None
            continue
        if isinstance(message, RankLoadFailed):
            for process in ranks:
                process.kill()
            raise RuntimeError(f"tensor-parallel rank {message.rank} failed to load:\n{message.traceback}")
        devices[message.rank] = message.device
        if message.rank == 0:
            pool = message.kv_pool_tokens
    return tuple(f"rank{r}:{devices[r]}" for r in sorted(devices)), pool
