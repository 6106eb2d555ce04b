"""The GPU check: a random-weight model of Llama-3.1-8B's shape in bfloat16, served on one GPU by the
engine's own path (the KV pool sized at load, packed prefill and mixed steps switched on by their checks
on this model, the batched sampler), measured in-process. One command on a lent GPU machine, after
`make gpu-wheels` here (the wheels this needs that the machine lacks, into .whl/; carry `.whl`):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_recipe.py --out $OUT

Smoke test on a CPU (what tests/unit/test_gpu_recipe.py runs, importing only what that machine has):

    .venv/bin/python benchmarks/gpu_recipe.py --device cpu --tiny --bandwidth-gbps 20

Reports as JSON (stdout, and gpu_recipe.json in --out): batch-1 decode tok/s against the memory-bandwidth
limit (every decode step reads every weight once); output tok/s at 8/32/64 concurrent sequences, greedy
and with the 8B entry's sampling (temperature 0.6, top_p 0.9); a mixed step against a decode step plus a
prefill; host syncs per decode step (torch.cuda.set_sync_debug_mode) and kernel launches per decode step
(profiler); the load-time checks' measured differences; the KV pool sized at load beside the planner's.
Random weights need no download; norm weights are 1 (so logits are not all near zero and the checks mean
something); token ids are decoded modulo the bench tokenizer's vocabulary.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shardbento.catalog import ServingLimits  # noqa: E402
from shardbento.engine.base import SamplingParams  # noqa: E402
from shardbento.engine.batch.runner import ModelRunner, PrefillChunk  # noqa: E402
from shardbento.engine.batch.sampler import RequestSampler  # noqa: E402
from shardbento.engine.batch.scheduler import Scheduler  # noqa: E402
from shardbento.engine.batch.sequence import Sequence  # noqa: E402
from shardbento.engine.output import OutputStream  # noqa: E402
from shardbento.metrics import RequestMetrics  # noqa: E402
from shardbento.tiny.models import ensure_generated  # noqa: E402

LLAMA_31_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
)
TINY = dict(LLAMA_31_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
TINY["num_key_value_heads"] = 2
MAX_MODEL_LEN = 4096
ENTRY_SAMPLING = {"temperature": 0.6, "top_p": 0.9}  # models/llama-3.1-8b-instruct.yaml's generation defaults

# Peak memory bandwidth (GB/s) from the vendors' data sheets, by a substring of torch.cuda.get_device_name().
# The first match wins, so the more specific names come first.
HBM_GBPS = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM, HBM3
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40 GB
    ("L40S", 864.0),
    ("A10G", 600.0),
    ("L4", 300.0),
)


def bandwidth_gbps(device_name: str) -> float | None:
    return next((gbps for name, gbps in HBM_GBPS if name in device_name), None)


class ModuloTokenizer:
    """Decodes any id of the big vocabulary with the small bench tokenizer (text is not the point here)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._size = len(tokenizer)
        self.all_special_ids = tokenizer.all_special_ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode([i % self._size for i in ids], skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return self._tokenizer.convert_ids_to_tokens(token_id % self._size)


def build_model(shape: dict, device: str):
    """The shape's Llama built directly on the device in bfloat16: weights N(0, 0.02), norms at 1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape)
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(std=0.02)
    return model


class CheckLog(logging.Handler):
    """The load-time checks' INFO lines (what the server logs), kept for the report."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_batch(scheduler, tokenizer, concurrency: int, input_tokens: int, output_tokens: int, sampling: dict):
    """`concurrency` requests submitted at once, each exactly `output_tokens` long: (output tok/s over
    the whole run, decode tok/s of request 0: tokens after its first over the time after its first)."""
    done = threading.Semaphore(0)
    params = SamplingParams(max_tokens=output_tokens, ignore_eos=True, **sampling)
    token_times: dict[int, list[float]] = {i: [] for i in range(concurrency)}
    failures: list[BaseException] = []

    def channel(i: int):
        def emit(item) -> None:
            if isinstance(item, BaseException):
                failures.append(item)
            else:
                token_times[i].extend(time.perf_counter() for _ in item.token_ids)
            if isinstance(item, BaseException) or item.finish_reason is not None:
                done.release()

        return emit

    start = time.perf_counter()
    for i in range(concurrency):
        prompt = [(i * 7919 + j * 104729) % 120000 + 10 for j in range(input_tokens)]
        sampler = RequestSampler(params, eos_ids=set(), decode=lambda t: "")
        output = OutputStream(tokenizer, tuple(prompt), params, set())
        scheduler.submit(Sequence(f"r{i}", prompt, sampler, output, channel(i)))
    for _ in range(concurrency):
        done.acquire()
    elapsed_s = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"a request failed: {failures[0]!r}")
    times = token_times[0]
    return concurrency * output_tokens / elapsed_s, (len(times) - 1) / (times[-1] - times[0])


def deliver_each(items: list) -> list:
    """The scheduler's `deliver`: every request's channel is a plain callable on the engine thread."""
    for channel, item in items:
        channel(item)
    return []


def decode_step_costs(runner: ModelRunner, device: str, rows: int, prompt_tokens: int) -> dict:
    """Per decode step of `rows` sequences through the scheduler's sampler: host syncs (CUDA's sync
    debug mode counts them) and kernel launches (the profiler's runtime API events); and a mixed step of
    those rows and a `prompt_tokens` prompt against a decode step plus that prefill, each timed."""
    from shardbento.engine.batch.sampler import select_tokens

    samplers = [
        RequestSampler(SamplingParams(max_tokens=64, **ENTRY_SAMPLING), set(), str) for _ in range(rows)
    ]
    prompts = [PrefillChunk(i, tuple(range(10 + i, 10 + i + 32)), 0, i) for i in range(rows)]
    runner.prefill(prompts)
    tokens = [5] * rows

    def step() -> None:
        logits = runner.decode(tokens)
        select_tokens(samplers, logits)

    step()
    report: dict = {}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(5):
                step()
        torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        report["host_syncs_per_decode_step"] = len(syncs) / 5
        report["sync_sites"] = sorted({str(w.message)[:120] for w in syncs})[:5]
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        launches = sum(e.count for e in prof.key_averages() if e.key.startswith(("cudaLaunch", "cuLaunch")))
        report["kernel_launches_per_decode_step"] = launches / 3
    report["mixed_step_vs_apart_ms"] = _mixed_against_apart(runner, rows, prompt_tokens, device)
    runner.release(list(range(runner.num_rows)))
    return report


def _mixed_against_apart(runner: ModelRunner, rows: int, prompt_tokens: int, device: str) -> dict:
    def timed(fn) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000

    prompt = tuple(range(1000, 1000 + prompt_tokens))
    tokens = [7] * rows
    mixed_ms, apart_ms = [], []
    slot = runner.num_rows  # the prompt's row after the running ones
    chunk = PrefillChunk(-10, prompt, 0, slot)
    for _ in range(3):
        mixed_ms.append(timed(lambda: runner.mixed([chunk], tokens)))
        runner.release([slot])
        apart_ms.append(timed(lambda: (runner.decode(tokens), runner.prefill([chunk]))))
        runner.release([slot])
    return {
        "rows": rows,
        "prompt_tokens": prompt_tokens,
        "mixed": round(sorted(mixed_ms)[1], 2),
        "decode_then_prefill": round(sorted(apart_ms)[1], 2),
        "mixes": runner.mixes,
    }


def planned_pool(shape: dict, device: str, limits: ServingLimits) -> int | None:
    """The KV pool the planner predicts for this shape on this GPU (its memory as the device reports)."""
    if not device.startswith("cuda"):
        return None
    from shardbento.catalog import ModelSpec
    from shardbento.plan.memory import GpuKind, model_shape
    from shardbento.plan.sharding import plan_spec

    props = torch.cuda.get_device_properties(0)
    gpu = GpuKind(props.name, props.total_memory, (props.major, props.minor))
    spec = ModelSpec(
        name="gpu-recipe", source="generated:bench", kind="text", gpus=1, engine="transformers", limits=limits
    )
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **shape}
    return plan_spec(
        spec, model_shape(config), gpu, dtype="bfloat16", max_model_len=MAX_MODEL_LEN
    ).kv_pool_tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--bandwidth-gbps", type=float, help="memory bandwidth, GB/s; default: by the GPU's name"
    )
    parser.add_argument("--input-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument(
        "--tiny", action="store_true", help="a 2-layer model of the same vocabulary (smoke test)"
    )
    parser.add_argument("--out", type=Path, help="a folder to write gpu_recipe.json into")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    bandwidth = args.bandwidth_gbps or bandwidth_gbps(device_name)
    if bandwidth is None:
        parser.error(f"no known memory bandwidth for {device_name!r}: pass --bandwidth-gbps")
    checks = CheckLog()
    logging.getLogger("shardbento").addHandler(checks)
    logging.getLogger("shardbento").setLevel(logging.INFO)

    shape = TINY if args.tiny else LLAMA_31_8B
    started = time.perf_counter()
    model = build_model(shape, args.device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tokenizer = ModuloTokenizer(AutoTokenizer.from_pretrained(ensure_generated("bench-llama")))
    most = max(args.concurrency)
    limits = ServingLimits(max_num_seqs=most, max_waiting=most)
    runner = ModelRunner(model, most, MAX_MODEL_LEN)
    with torch.inference_mode():
        pool_tokens = runner.allocate_pool(limits)
    scheduler = Scheduler(runner, limits, RequestMetrics("gpu-recipe"), deliver=deliver_each)
    report: dict = {
        "device": device_name,
        "torch": torch.__version__,
        "shape": "tiny" if args.tiny else "Llama-3.1-8B",
        "bandwidth_gbps": bandwidth,
        "weight_gib": round(weight_bytes / 2**30, 2),
        "kv_pool_tokens": pool_tokens,
        "kv_pool_tokens_planned": planned_pool(shape, args.device, limits),
        "packs": runner.packs,
        "mixes": runner.mixes,
        "lean_decode": runner.lean is not None,
        "self_checks": [line for line in checks.lines if "on this model" in line],
    }
    try:
        run_batch(scheduler, tokenizer, 1, args.input_tokens, 8, {})  # warm-up
        _, batch1 = run_batch(scheduler, tokenizer, 1, args.input_tokens, args.output_tokens, {})
        limit = bandwidth * 1e9 / weight_bytes
        report.update(
            batch1_decode_tok_s=round(batch1, 1),
            hbm_limit_tok_s=round(limit, 1),
            fraction_of_limit=round(batch1 / limit, 3),
        )
        for concurrency in args.concurrency:
            for name, sampling in (("greedy", {}), ("sampled", ENTRY_SAMPLING)):
                tok_s, _ = run_batch(
                    scheduler, tokenizer, concurrency, args.input_tokens, args.output_tokens, sampling
                )
                report[f"concurrency_{concurrency}_{name}_tok_s"] = round(tok_s, 1)
    finally:
        scheduler.close()
    with torch.inference_mode():
        rows = min(32, most - 1)  # one slot left for the mixed step's prompt
        report.update(decode_step_costs(runner, args.device, rows, 24 if args.tiny else 512))
    report["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_recipe.json").write_text(text)


if __name__ == "__main__":
    main()
