"""The GPU recipe: a random-weight model of Llama-3.1-8B's shape in bfloat16, measured in-process on one GPU.

    .venv/bin/python benchmarks/gpu_recipe.py                        # bandwidth looked up by the GPU's name
    .venv/bin/python benchmarks/gpu_recipe.py --device cpu --tiny --bandwidth-gbps 20   # a smoke test

Reports (JSON on stdout):
- batch-1 decode tok/s through shardbento's scheduler (tokens after the first over the time after the
  first), beside the HBM-bandwidth limit (every decode step reads every weight once: limit = bandwidth /
  weight bytes);
- output tok/s at concurrency 64 through the same scheduler (continuous batching, fixed output lengths).
Random weights need no download; token ids are decoded modulo the bench tokenizer's vocabulary.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shardbento.catalog import ServingLimits  # noqa: E402
from shardbento.engine.base import SamplingParams  # noqa: E402
from shardbento.engine.batch.runner import ModelRunner  # noqa: E402
from shardbento.engine.batch.sampler import RequestSampler  # noqa: E402
from shardbento.engine.batch.scheduler import Scheduler, Sequence  # noqa: E402
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

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode([i % self._size for i in ids], skip_special_tokens=skip_special_tokens)


def build_model(shape: dict, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, torch_dtype=dtype)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    for parameter in model.parameters():  # small random weights keep activations finite in bf16
        torch.nn.init.normal_(parameter, std=0.02)
    return model


def call_each(items: list) -> list:
    """The scheduler's `deliver`: here every request's channel is a plain callable on the engine thread."""
    for channel, item in items:
        channel(item)
    return []


def run_batch(
    scheduler: Scheduler, tokenizer, concurrency: int, input_tokens: int, output_tokens: int
) -> tuple[float, float]:
    """`concurrency` requests submitted at once, each exactly `output_tokens` long: (output tok/s over
    the whole run, decode tok/s of one request: tokens after its first over the time after its first)."""
    done = threading.Semaphore(0)
    params = SamplingParams(max_tokens=output_tokens, ignore_eos=True)
    token_times: dict[int, list[float]] = {i: [] for i in range(concurrency)}

    def channel(i: int):
        def emit(item) -> None:
            if not isinstance(item, BaseException):
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
    times = token_times[0]
    if len(times) != output_tokens:
        raise RuntimeError(f"request 0 produced {len(times)} tokens, expected {output_tokens}")
    return concurrency * output_tokens / elapsed_s, (len(times) - 1) / (times[-1] - times[0])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--bandwidth-gbps", type=float, help="memory bandwidth, GB/s; default: looked up by the GPU's name"
    )
    parser.add_argument("--input-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--tiny", action="store_true", help="a 2-layer model of the same vocabulary (smoke test)"
    )
    args = parser.parse_args()
    from transformers import AutoTokenizer

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    bandwidth = args.bandwidth_gbps or bandwidth_gbps(device_name)
    if bandwidth is None:
        parser.error(f"no known memory bandwidth for {device_name!r}: pass --bandwidth-gbps")

    dtype = torch.bfloat16
    model = build_model(TINY if args.tiny else LLAMA_31_8B, args.device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tokenizer = ModuloTokenizer(AutoTokenizer.from_pretrained(ensure_generated("bench-llama")))
    limits = ServingLimits(
        max_num_seqs=args.concurrency, max_waiting=args.concurrency, max_prefill_tokens=2048
    )
    runner = ModelRunner(model, args.concurrency, args.input_tokens + args.output_tokens + 1)
    scheduler = Scheduler(runner, limits, RequestMetrics("gpu-recipe"), deliver=call_each)
    try:
        run_batch(scheduler, tokenizer, 1, args.input_tokens, 8)  # warm-up
        _, batch1 = run_batch(scheduler, tokenizer, 1, args.input_tokens, args.output_tokens)
        batched, _ = run_batch(scheduler, tokenizer, args.concurrency, args.input_tokens, args.output_tokens)
    finally:
        scheduler.close()
    limit = bandwidth * 1e9 / weight_bytes
    report = {
        "device": device_name,
        "bandwidth_gbps": bandwidth,
        "weight_gib": round(weight_bytes / 2**30, 2),
        "batch1_decode_tok_s": round(batch1, 1),
        "hbm_limit_tok_s": round(limit, 1),
        "fraction_of_limit": round(batch1 / limit, 3),
        f"concurrency_{args.concurrency}_tok_s": round(batched, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
