"""What token selection costs a CPU step, by the way sampled rows are drawn: select_tokens() on the
logits of a bench-llama decode step (16 rows, its whole vocabulary), greedy, at temperature alone, with
top_p and with top_k, each as shipped (top_p: drawn from the whole distribution and kept when the
nucleus holds it; top_k: among each row's own k best) and forced through the sorted vocabulary (what
such rows did before). One process; the ways alternate round by round and the table shows each way's
median time over the rounds. `--vocab 128256` times the same ways at a real model's vocabulary width.

    .venv/bin/python benchmarks/sampling_rows.py [--rounds 5] [--vocab N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ROWS = 16
CALLS = 100  # select_tokens() calls per way and round; the first 10 are not counted
# every sampled row through the sorted vocabulary (no candidates, however wide, and no nucleus draws)
SORTED = {"NUCLEUS_DRAWS": 0, "CANDIDATES": 0, "CANDIDATE_VOCAB": 10**9}
WAYS = {  # label: (sampling parameters, settings of engine/batch/sampling.py for this way)
    "greedy": ({"temperature": 0.0}, {}),
    "temperature 0.6": ({"temperature": 0.6}, {}),
    "temperature 0.6, top_p 0.9 (shipped: drawn)": ({"temperature": 0.6, "top_p": 0.9}, {}),
    "temperature 0.6, top_p 0.9 (sorted)": ({"temperature": 0.6, "top_p": 0.9}, SORTED),
    "temperature 0.6, top_k 50 (shipped: among its own 50)": ({"temperature": 0.6, "top_k": 50}, {}),
    "temperature 0.6, top_k 50 (sorted)": ({"temperature": 0.6, "top_k": 50}, SORTED),
}


def step_logits():
    """The logits of one decode step of ROWS sequences of bench-llama, loaded as served."""
    import torch

    from shardbento.catalog import ModelSpec, ServingLimits
    from shardbento.engine.batch.runner import ModelRunner, PrefillChunk
    from shardbento.engine.hf.loading import load_model
    from shardbento.plan.preflight import run_preflight

    fields = {"name": "bench-llama", "source": "generated:bench-llama", "kind": "text", "dtype": "float32"}
    spec = ModelSpec.model_validate(fields)
    runner = ModelRunner(load_model(spec, run_preflight(spec)).model, ROWS, 1024)
    with torch.inference_mode():
        runner.allocate_pool(ServingLimits())
        runner.prefill([PrefillChunk(100 + i, tuple(range(5 + i, 133 + i)), 0, i) for i in range(ROWS)])
        return runner.decode([7] * ROWS)


def time_way(logits, fields: dict, settings: dict[str, int]) -> float:
    """The median select_tokens() time (ms) for ROWS rows sampled with `fields`."""
    from shardbento.engine.base import SamplingParams
    from shardbento.engine.batch import sampling
    from shardbento.engine.batch.sampler import RequestSampler, select_tokens

    shipped = {name: getattr(sampling, name) for name in settings}
    for name, value in settings.items():
        setattr(sampling, name, value)
    try:
        samplers = [
            RequestSampler(SamplingParams(max_tokens=CALLS, **fields), set(), str) for _ in range(ROWS)
        ]
        times = []
        for _ in range(CALLS):
            start = time.perf_counter()
            select_tokens(samplers, logits)
            times.append(time.perf_counter() - start)
    finally:
        for name, value in shipped.items():
            setattr(sampling, name, value)
    return statistics.median(times[10:]) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--vocab",
        type=int,
        help="a vocabulary this wide instead (128256: Llama 3's), random logits of the step's mean and spread",
    )
    args = parser.parse_args()
    import torch

    from shardbento.engine.hf.cpu_kernels import keep_freed_memory

    keep_freed_memory()  # as the engine process does: wide vocabularies' buffers are not re-faulted
    logits = step_logits()
    if args.vocab:
        spread = torch.randn(ROWS, args.vocab, generator=torch.Generator().manual_seed(0))
        logits = logits.mean() + logits.std() * spread
    results: dict[str, list[float]] = {label: [] for label in WAYS}
    with torch.inference_mode():
        for number in range(args.rounds):
            for label, (fields, settings) in WAYS.items():
                results[label].append(time_way(logits, fields, settings))
            print(f"round {number + 1}: {[round(r[-1], 3) for r in results.values()]}", file=sys.stderr)
    print(f"| {ROWS} rows, {logits.shape[-1]}-token vocabulary | select_tokens() ms (median of rounds) |")
    print("|---|---:|")
    for label, times in results.items():
        print(f"| {label} | {statistics.median(times):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
