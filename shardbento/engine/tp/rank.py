"""One tensor-parallel rank: joins the process group, loads its shard, and serves what rank 0 drives."""

from __future__ import annotations

import logging
import os
import traceback
from typing import Any

from shardbento.engine.tp.messages import (
    GenerateCall,
    GeneratedToken,
    GenerateEnded,
    RankChannels,
    RankConfig,
    RankLoadFailed,
    RankReady,
    Stop,
)

logger = logging.getLogger(__name__)


def run_rank(config: RankConfig, channels: RankChannels) -> None:
    """Entry point of a rank process: load, report ready, serve until Stop, leave the group together."""
    logging.basicConfig(level=logging.INFO, format=f"rank {config.rank} %(levelname)s %(name)s: %(message)s")
    try:
        import torch.distributed as dist

        model = _join_and_load(config)
        tokenizer = _load_tokenizer(config) if config.rank == 0 else None
        runner = _runner(model, config) if config.kind == "text" else None
    except Exception:  # noqa: BLE001 - reported to the service, which fails startup with it
        channels.status.put(RankLoadFailed(config.rank, traceback.format_exc()))
        return
    pool = runner.kv.pool_tokens if runner is not None else None
    channels.status.put(RankReady(config.rank, str(next(model.parameters()).device), pool))
    try:
        if runner is not None:
            _serve_batched(runner, model, config, channels, tokenizer)
        else:
            _serve_generate(model, config, channels, tokenizer)
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _runner(model: Any, config: RankConfig) -> Any:
    """The batch's runner with its KV pool allocated (every rank in step: the warm-up is collective)."""
    import torch

    from shardbento.engine.batch.runner import ModelRunner

    runner = ModelRunner(model, config.max_num_seqs, config.max_model_len)
    with torch.inference_mode():
        runner.allocate_pool(config.limits)
    return runner


def _serve_batched(
    runner: Any, model: Any, config: RankConfig, channels: RankChannels, tokenizer: Any
) -> None:
    """Text: rank 0 schedules and samples; every other rank replays its runner calls."""
    from shardbento.engine.grammar import Grammars
    from shardbento.engine.tp.lead import follow, lead  # torch-heavy: imported in the rank process only

    if config.rank == 0:
        eos_ids = set(config.eos_token_ids)
        grammars = Grammars(tokenizer, eos_ids, logits_width=model.config.get_text_config().vocab_size)
        lead(runner, tokenizer, config.limits, eos_ids, grammars, channels)
    else:
        follow(runner, channels.control[config.rank - 1])


def _serve_generate(model: Any, config: RankConfig, channels: RankChannels, tokenizer: Any) -> None:
    """Vision: one request at a time through generate() on every rank, rank 0 broadcasting each call."""
    import torch.distributed as dist

    decode = (lambda token_id: tokenizer.decode([token_id])) if tokenizer is not None else None
    results = channels.results if config.rank == 0 else None
    while True:
        box = [channels.requests.get() if config.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        call = box[0]
        if isinstance(call, Stop):
            return
        _generate(model, config, call, results, channels.cancel, decode)


def _join_and_load(config: RankConfig) -> Any:
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(config.master_port),
        RANK=str(config.rank),
        LOCAL_RANK=str(config.rank),
        WORLD_SIZE=str(config.world_size),
    )
    if config.device == "cuda":
        torch.cuda.set_device(config.rank)
    else:
        torch.set_num_threads(1)  # N ranks share the host's cores; more threads only contend
        if config.cpu_kernels == "onednn":
            from shardbento.engine.hf.cpu_kernels import keep_freed_memory

            keep_freed_memory()
    backend = "nccl" if config.device == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=config.rank, world_size=config.world_size)
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, DistributedConfig

    import shardbento.engine.hf.glm4v  # noqa: F401 - registers GLM-4V's converted model type

    model_class = AutoModelForImageTextToText if config.kind == "vision" else AutoModelForCausalLM
    model = model_class.from_pretrained(
        config.model_path,
        dtype=getattr(torch, config.dtype),
        distributed_config=DistributedConfig(tp_size=config.world_size),
        trust_remote_code=config.trust_remote_code,
    )
    return model.eval()


class _RankStreamer:
    """Rank 0's streamer: every new token id goes to the service process."""

    def __init__(self, request_id: str, results: Any, sampler: Any) -> None:
        self._request_id = request_id
        self._results = results
        self._sampler = sampler
        self._saw_prompt = False

    def put(self, value: Any) -> None:
        if not self._saw_prompt:
            self._saw_prompt = True
            return
        token_id = int(value.reshape(-1)[0])
        self._results.put(GeneratedToken(self._request_id, token_id, self._sampler.pop_logprob()))

    def end(self) -> None:
        self._results.put(GenerateEnded(self._request_id))


class _SyncedStop:
    """Stops every rank at the same step: rank 0 reads the cancel flag and broadcasts it.

    Ranks must run the same number of forward passes (each one is a collective), so the decision
    to stop early (stop string, client gone) is made once, on rank 0, and shared.
    """

    def __init__(self, cancel: Any, device: str) -> None:
        self._cancel = cancel
        self._device = device

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self._cancel.is_set() else 0], device=input_ids.device)
        dist.broadcast(flag, src=0)
        return torch.full((input_ids.shape[0],), bool(flag.item()), dtype=torch.bool, device=input_ids.device)


def _load_tokenizer(config: RankConfig) -> Any:
    """Rank 0's tokenizer: the scheduler detokenizes (stop strings) and names logprob tokens there."""
    from transformers import AutoTokenizer

    from shardbento.engine.hf.chatglm3_tokenizer import load_converted  # decodes as the service's does

    converted = load_converted(config.model_path)
    if converted is not None:
        return converted
    return AutoTokenizer.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)


def _generate(
    model: Any, config: RankConfig, call: GenerateCall, results: Any, cancel: Any, decode: Any
) -> None:
    import torch

    from shardbento.engine.batch.sampler import RequestSampler, forced_generate_kwargs

    device = model.device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in call.inputs.items()}
    params = call.params
    sampler = RequestSampler(params, eos_ids=set(config.eos_token_ids), decode=decode or str)
    streamer = _RankStreamer(call.request_id, results, sampler) if results is not None else None
    try:
        with torch.inference_mode():
            model.generate(
                **inputs,
                **forced_generate_kwargs(sampler, params, config.eos_token_ids, config.pad_token_id),
                stopping_criteria=[_SyncedStop(cancel, config.device)],
                streamer=streamer,
            )
    except Exception as exc:  # noqa: BLE001 - the request fails; the service decides about the engine
        logger.exception("request %s failed on rank %d", call.request_id, config.rank)
        if results is not None:
            results.put(GenerateEnded(call.request_id, error=f"{type(exc).__name__}: {exc}"))
