"""Which CPU linear kernel a decode step should use, by the number of rows it multiplies: the engine's
decode step on bench-llama (through ModelRunner, the pool as served) with every linear on the default
BLAS call, on the packed oneDNN kernel, and as shipped (the default call up to the crossover that
cpu_kernels.measure_kernels found at load, packed above; each round prints the crossover). Each
configuration runs in a fresh process (malloc's history and thread pools differ), the three alternate
round by round, and the table shows each batch size's median step time over the rounds.

    .venv/bin/python benchmarks/linear_rows.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODES = ("default", "packed", "shipped")
ROWS = (1, 2, 4, 8, 16)
STEPS = 150  # decode steps per batch size; the first 20 are not counted


def measure(mode: str) -> dict[int, float]:
    """One process: bench-llama loaded as served, its decode step timed at each batch size (ms)."""
    import time

    import torch

    from shardbento.catalog import ModelSpec, ServingLimits
    from shardbento.engine.batch.runner import ModelRunner, PrefillChunk
    from shardbento.engine.hf import cpu_kernels
    from shardbento.engine.hf.loading import load_model
    from shardbento.plan.preflight import run_preflight

    kernels = "onednn" if mode == "shipped" else "default"
    fields = {"name": "bench-llama", "source": "generated:bench-llama", "kind": "text", "dtype": "float32"}
    spec = ModelSpec.model_validate({**fields, "cpu_kernels": kernels})
    model = load_model(spec, run_preflight(spec)).model
    if mode != "shipped":
        cpu_kernels.keep_freed_memory()  # the same allocator settings in all three
    if mode == "packed":
        cpu_kernels.pack_linear_weights(model, plain_max_rows=0)
    runner = ModelRunner(model, max(ROWS), 1024)
    packed = getattr(model.lm_head.forward, "args", ())  # _by_rows' arguments where packed
    medians = {"default call up to rows": packed[3]} if packed else {}
    with torch.inference_mode():
        runner.allocate_pool(ServingLimits())
        for rows in ROWS:
            runner.release(list(range(runner.num_rows)))
            runner.prefill([PrefillChunk(100 + i, tuple(range(5 + i, 133 + i)), 0, i) for i in range(rows)])
            times = []
            for _ in range(STEPS):
                start = time.perf_counter()
                runner.decode([7] * rows).argmax(-1).tolist()
                times.append(time.perf_counter() - start)
            medians[rows] = statistics.median(times[20:]) * 1e3
    return medians


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one measuring process
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode)))
        return 0
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for number in range(args.rounds):
        for mode in MODES:
            out = subprocess.run(
                [sys.executable, __file__, "--mode", mode],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
            )
            results[mode].append(json.loads(out.stdout.splitlines()[-1]))
            print(f"round {number + 1} {mode}: {results[mode][-1]}", file=sys.stderr, flush=True)
    print("| decode step, ms (median of rounds) | " + " | ".join(f"{r} rows" for r in ROWS) + " |")
    print("|---|" + "---:|" * len(ROWS))
    for mode in MODES:
        cells = [statistics.median(run[str(r)] for run in results[mode]) for r in ROWS]
        print(f"| {mode} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
