"""Vision models in the continuous batch against the one-at-a-time generate() path, on this machine:
tiny-mllama (cross-attention) and tiny-qwen2.5-vl (multimodal rotary positions), each served twice by
`bentoml serve` (batched, and with SHARDBENTO_FORCE_GENERATE=1), loaded by `python -m shardbento bench`
with a mixed load: concurrency 8, every second conversation opening with a picture of its own, short
answers (32 tokens: each request's prefill weighs) and longer ones (128 tokens).

    .venv/bin/python benchmarks/vision_batch.py --write   # the "vision-batch" section of docs/benchmarks.md

Both servers of a family are started first; each round then runs the level against one and the other,
and the table shows the median of the rounds (and each round's figure). The goal: batched output tok/s at
least 4 x generate()'s on the same load in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import REPO, Peer, bench_level, cpu_name, replace_section, start_peer, stop  # noqa: E402
from side_by_side import BIN  # noqa: E402

FAMILIES = ("tiny-mllama", "tiny-qwen2.5-vl")
MODES = {"batched": {}, "generate()": {"SHARDBENTO_FORCE_GENERATE": "1"}}
GOAL = 4.0
NOTE = (
    "Short answers weigh the prefills: every request's prompt is a forward of its own (an image prompt "
    "alone with its pixels; Mllama's text prompts too while image rows run, since a mixed forward has no "
    "cross-attention keys), and on models this small a forward costs nearly as much for one row as for "
    "eight (a few ms of per-operation overhead), so the batch gains more the longer the answers."
)


def peer(model: str, mode: str, work: Path) -> Peer:
    """`bentoml serve` of a catalog entry in one mode, with its own BentoML home."""
    home = work / f"bentoml-{model}-{mode.strip('()')}"
    return Peer(
        f"{model} {mode}",
        [str(BIN / "bentoml"), "serve", "service:ShardBento", "--arg", f"model={model}"],
        {**MODES[mode], "BENTOML_HOME": str(home)},
        model,
        BIN / "bentoml",
    )


Rates = dict[str, list[float] | str]  # mode -> each round's output tok/s, or why it was not measured


def measure(model: str, args: argparse.Namespace, work: Path) -> dict[int, Rates]:
    """For each answer length, output tok/s of each round in each mode."""
    running = {mode: start_peer(peer(model, mode, work), work) for mode in MODES}
    lengths = [int(n) for n in args.output_tokens.split(",")]
    rates: dict[int, Rates] = {
        n: {m: s if isinstance(s, str) else [] for m, s in running.items()} for n in lengths
    }
    try:
        for round_index in range(args.rounds):
            for length in lengths:
                for mode, started in running.items():
                    if not isinstance(rates[length][mode], str):
                        _round(started, model, mode, length, round_index, rates[length], args, work)
    finally:
        for started in running.values():
            if not isinstance(started, str):
                stop(started.process)
    return rates


def _round(
    started: Any,
    model: str,
    mode: str,
    length: int,
    index: int,
    rates: Rates,
    args: argparse.Namespace,
    work: Path,
) -> None:
    """One bench level against one server: its rate appended, or why it failed."""
    load = argparse.Namespace(**{**vars(args), "output_tokens": length})
    extra = ["--image-every", "2", "--seed", str(index + 1)]
    report = bench_level(started, args.concurrency, load, work, extra, f"o{length}-r{index}")
    if isinstance(report, str):
        rates[mode] = report
        return
    level = report["levels"][0]
    if level["errors"]:
        rates[mode] = f"{level['errors']} of {level['requests']} requests failed"
        return
    rates[mode].append(level["output_token_throughput_per_s"])  # type: ignore[union-attr]
    print(f"{model} {mode} {length} tokens, round {index + 1}: {rates[mode][-1]:.1f} tok/s", flush=True)


def markdown(results: dict[str, dict], args: argparse.Namespace, load: tuple[str, str]) -> str:
    lines = [
        "## Vision models in the batch",
        "",
        f"`benchmarks/vision_batch.py` on {time.strftime('%Y-%m-%d', time.gmtime())}, "
        f"{os.cpu_count()} CPU cores ({cpu_name()}), load average "
        f"{load[0]} before and {load[1]} after. Each tiny vision model served twice by `bentoml serve`: "
        "batched (image prompts prefilled alone, then decoded with every other row) and with "
        "`SHARDBENTO_FORCE_GENERATE=1` (every request alone through `generate()`, the path these families "
        f"took before). Closed loop at concurrency {args.concurrency}, every second conversation opening "
        f"with a 64 x 48 picture of its own, ~{args.input_tokens} prompt tokens of text, answers of a fixed "
        f"length (min_tokens), {args.min_requests} requests a round; median of {args.rounds} rounds (each "
        f"round's figure after it). Goal: batched >= {GOAL:g} x generate().",
        "",
        "| model | answer tokens | batched output tok/s | generate() output tok/s | batched / generate() |",
        "|---|---:|---:|---:|---:|",
    ]
    for model, by_length in results.items():
        for length, rates in by_length.items():
            lines.append(f"| {model} | {length} | {_cells(rates)} |")
    lines += [
        "",
        NOTE,
        "",
        "Reproduce: `.venv/bin/python benchmarks/vision_batch.py --write` (about fifteen minutes on two cores).",
    ]
    return "\n".join(lines)


def _cells(rates: Rates) -> str:
    """Each mode's median (and rounds), then the ratio of the medians."""
    cells = [
        value if isinstance(value, str) else f"{statistics.median(value):.1f} ({_rounds(value)})"
        for value in (rates[mode] for mode in MODES)
    ]
    if any(isinstance(rates[mode], str) for mode in MODES):
        return " | ".join([*cells, "-"])
    ratio = statistics.median(rates["batched"]) / statistics.median(rates["generate()"])  # type: ignore[arg-type]
    return " | ".join([*cells, f"{ratio:.1f} x"])


def _rounds(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--input-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", default="32,128", help="comma-separated answer lengths")
    parser.add_argument("--min-requests", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--only", default=",".join(FAMILIES), help="comma-separated catalog names")
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shardbento-vision-"))
    before = f"{os.getloadavg()[0]:.2f}"
    results = {model: measure(model, args, work) for model in args.only.split(",")}
    section = markdown(results, args, (before, f"{os.getloadavg()[0]:.2f}"))
    print(section)
    if args.write:
        replace_section(REPO / "docs" / "benchmarks.md", "vision-batch", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
