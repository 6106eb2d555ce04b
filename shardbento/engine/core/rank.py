"""One engine rank process: joins the process group (tensor parallel), loads its part of the model, and
serves: rank 0 runs the loop and samples, the others replay its runner calls."""

from __future__ import annotations

import datetime
import faulthandler
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any

from shardbento.engine.core.affinity import describe_threads
from shardbento.engine.core.messages import RankChannels, RankConfig, RankLoadFailed, RankReady

logger = logging.getLogger(__name__)

# Vision architectures whose image requests join the continuous batch (prefilled alone with their
# pixels, then decoded with every other row); others keep the one-at-a-time generate() path. GLM-4V's
# image positions share one rotary position and Qwen2-VL's multimodal positions leave text positions
# shifted by a per-sequence delta: the prefill gives the offset and the KV slot keeps it
# (kvslots.position_offsets). Mllama's cross-attention layers read each row's image keys from the slot's
# cross-attention state (crossattn.py).
BATCHED_VISION_TYPES = frozenset({"llava", "shardbento_glm4v", "mllama", "qwen2_vl", "qwen2_5_vl"})
# Vision models whose rotary positions are the cache index: a cached prefix with their images is valid
# for any later prompt with the same images (GLM-4V's image positions are not).
PREFIX_CACHED_VISION_TYPES = frozenset({"llava"})


@dataclass(frozen=True)
class Loaded:
    """What a rank holds after loading: the model, where its inputs go, and (rank 0) its Preprocessor."""

    model: Any
    input_device: Any
    prompts: Any
    devices: tuple[str, ...]
    parallel: str


def run_rank(config: RankConfig, channels: RankChannels) -> None:
    """Entry point of a rank process: load, report ready, serve until Stop, leave the group together.
    A fatal engine failure (ranks out of step) exits with code 1 without the barrier."""
    logging.basicConfig(level=logging.INFO, format=f"rank {config.rank} %(levelname)s %(name)s: %(message)s")
    report_crashes()
    try:
        loaded = _load(config)
        logger.info(describe_threads(config.plan.device, os.environ))  # torch is loaded: threads are placed
        runner, batches = _runner(loaded, config)
    except Exception:  # noqa: BLE001 - reported to the service, which fails startup with it
        channels.status.put(RankLoadFailed(config.rank, traceback.format_exc()))
        return
    pool = runner.kv.pool_tokens if batches else None
    channels.status.put(
        RankReady(config.rank, str(loaded.input_device), pool, loaded.devices, loaded.parallel)
    )
    import torch.distributed as dist

    from shardbento.engine.batch.scheduler import FatalEngineError

    try:
        if config.rank == 0:
            _lead(loaded, runner, batches, config, channels)
        else:
            from shardbento.engine.core.lead import follow

            follow(runner, channels.control[config.rank - 1])
        if dist.is_initialized():
            dist.barrier()
    except FatalEngineError:
        logger.exception("the engine cannot go on")
        sys.stdout.flush()
        os._exit(1)  # no barrier, no teardown: the other ranks may sit in a collective that never ends
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def report_crashes() -> None:
    """A crash in native code (a segfault in a kernel or an extension) prints every thread's Python stack
    to stderr, the server's log, before the process dies: the service only sees the exit code."""
    faulthandler.enable(file=sys.stderr, all_threads=True)


def _lead(loaded: Loaded, runner: Any, batches: bool, config: RankConfig, channels: RankChannels) -> None:
    from shardbento.engine.batch.adapters import AdapterSlots
    from shardbento.engine.batch.scheduler import Scheduler
    from shardbento.engine.core.adapters import AdapterControl, AdapterRegistry, catalog_adapters
    from shardbento.engine.core.generate import GenerateLoop
    from shardbento.engine.core.lead import SequenceFactory, lead

    limits = config.spec.limits
    model_type = getattr(loaded.model.config, "model_type", None)
    make_sequence = SequenceFactory(
        loaded.prompts,
        image_token_id=getattr(loaded.model.config, "image_token_id", None),
        caches_image_prefixes=model_type in PREFIX_CACHED_VISION_TYPES,
        adapters=AdapterRegistry(catalog_adapters(config.spec) if batches else []),
    )
    adapters = AdapterControl(make_sequence.adapters, runner)
    if batches:

        def loop_of(mirror: Any, metrics: Any, deliver: Any) -> Any:
            scheduler = Scheduler(mirror, limits, metrics, deliver=deliver, start=False)
            name_of = make_sequence.adapters.name_of
            scheduler.adapters = AdapterSlots(mirror, config.spec.max_loras, name_of, metrics)
            adapters.bind(scheduler, mirror, deliver)
            return scheduler
    else:

        def loop_of(mirror: Any, metrics: Any, deliver: Any) -> Any:
            adapters.bind(None, mirror, deliver)
            return GenerateLoop(mirror, runner, limits, metrics, deliver)

    lead(loop_of, runner, make_sequence, channels, config.fault, adapters)


def _runner(loaded: Loaded, config: RankConfig) -> tuple[Any, bool]:
    """The batch's runner with its KV pool allocated (every rank in step: the warm-up is collective), or
    the one-at-a-time generate() runner for models whose decode cannot join the batch."""
    import torch

    spec = config.spec
    model_type = getattr(loaded.model.config, "model_type", None)
    why = "SHARDBENTO_FORCE_GENERATE" if config.force_generate else f"{model_type} does not batch"
    if not config.force_generate and (spec.kind == "text" or model_type in BATCHED_VISION_TYPES):
        from shardbento.engine.batch.runner import ModelRunner
        from shardbento.engine.batch.visioncheck import CHECKED_VISION_TYPES
        from shardbento.engine.core.adapters import register_catalog

        runner = ModelRunner(
            loaded.model, config.plan.max_num_seqs, config.plan.max_model_len, max_images=spec.max_images
        )
        register_catalog(runner, spec)  # their device slots are allocated before the KV pool is sized
        with torch.inference_mode():
            tokens = runner.allocate_pool(spec.limits)
            checked = spec.kind == "text" or model_type not in CHECKED_VISION_TYPES or runner.batches_images()
        if checked:
            logger.info("model %s: KV pool of %d tokens (%s)", spec.name, tokens, runner.pool_source)
            return runner, True
        del runner  # its pool goes back before generate() runs
        why = "the load-time check of image rows in the batch failed on this model"
    if spec.lora_adapters:
        raise RuntimeError(
            f"model {spec.name} ({model_type}) runs one request at a time through generate() ({why}), "
            "which serves no LoRA adapters: remove lora_adapters from its catalog entry"
        )
    from shardbento.engine.core.generate import GenerateRunner

    prompts = loaded.prompts
    eos_ids = set(prompts.eos_token_ids) if prompts is not None else set()
    pad = prompts.pad_token_id if prompts is not None else 0
    logger.info("model %s: one request at a time through generate() (%s)", spec.name, why)
    return GenerateRunner(loaded.model, loaded.input_device, eos_ids, pad), False


def _load(config: RankConfig) -> Loaded:
    """The whole model as the plan places it (one device or a layer split), or this rank's shard."""
    spec = config.spec
    if config.world_size == 1:
        from shardbento.engine.hf.loading import load_model

        loaded = load_model(spec, config.plan)
        return Loaded(loaded.model, loaded.input_device, loaded.prompts, loaded.devices, loaded.parallel)
    model = _join_and_load(config)
    prompts = None
    if config.rank == 0:
        from shardbento.engine.hf.preprocess import load_preprocessor

        prompts = load_preprocessor(spec, config.model_path, model.config, model.generation_config)
    device = next(model.parameters()).device
    return Loaded(model, device, prompts, (str(device),), f"tensor x{config.world_size}")


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
    spec = config.spec
    if config.plan.device == "cuda":
        torch.cuda.set_device(config.rank)
    else:
        torch.set_num_threads(1)  # N ranks share the host's cores; more threads only contend
        if spec.cpu_kernels == "onednn":
            from shardbento.engine.hf.cpu_kernels import keep_freed_memory

            keep_freed_memory()
    dist.init_process_group(
        backend="nccl" if config.plan.device == "cuda" else "gloo",
        rank=config.rank,
        world_size=config.world_size,
        timeout=datetime.timedelta(seconds=config.collective_timeout_s),
    )
    from shardbento.engine.hf.loading import resolve_dtype
    from shardbento.engine.hf.tensor_parallel import load_shard

    return load_shard(spec, config.model_path, config.world_size, resolve_dtype(spec))
