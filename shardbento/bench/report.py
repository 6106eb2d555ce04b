"""Benchmark figures from request results: percentiles, throughput, a text table and a PNG plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shardbento.bench.loadgen import RequestResult

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _spread(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    """p50/p90/p99 and mean, in milliseconds by default."""
    out: dict[str, float | None] = {f"p{q}": _scaled(percentile(values, q), scale) for q in PERCENTILES}
    out["mean"] = _scaled(sum(values) / len(values), scale) if values else None
    return out


def _scaled(value: float | None, scale: float) -> float | None:
    return None if value is None else round(value * scale, 3)


def summarize(results: list[RequestResult], wall_s: float, concurrency: int) -> dict[str, Any]:
    """One concurrency level's report: latencies in ms, throughput per second, errors, tokens received."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [
        (r.e2e_s - r.ttft_s) / (r.output_tokens - 1)
        for r in ok
        if r.ttft_s is not None and r.output_tokens > 1
    ]
    itl = [b - a for r in ok for a, b in zip(r.chunk_times_s, r.chunk_times_s[1:], strict=False)]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if not r.ok})[:3],
        "duration_s": round(wall_s, 3),
        "request_throughput_per_s": round(len(ok) / wall_s, 3) if wall_s else None,
        "output_token_throughput_per_s": round(output_tokens / wall_s, 2) if wall_s else None,
        "output_tokens_received": output_tokens,
        "mean_output_tokens": round(output_tokens / len(ok), 2) if ok else None,
        "mean_prompt_tokens": round(sum(prompt_tokens) / len(prompt_tokens), 1) if prompt_tokens else None,
        "ttft_ms": _spread(ttft),
        # the level's first answered request (at c=1 the first sent): with a shared prefix, the one
        # that had to prefill it; the p50 is then the later requests' figure
        "first_ttft_ms": round(ok[0].ttft_s * 1e3, 2) if ok and ok[0].ttft_s is not None else None,
        "tpot_ms": _spread(tpot),
        "itl_ms": _spread(itl),
        "e2e_ms": _spread([r.e2e_s for r in ok]),
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


TABLE_HEADER = (
    "| c | requests | errors | out tok/s | req/s | tokens/req | TTFT p50 ms | TTFT p99 ms "
    "| TPOT p50 ms | ITL p50 ms | ITL p99 ms | E2E p50 ms | E2E p99 ms |"
)


def table_row(level: dict[str, Any], label: str | None = None) -> str:
    cells = [
        label or str(level["concurrency"]),
        str(level["requests"]),
        str(level["errors"]),
        _fmt(level["output_token_throughput_per_s"]),
        _fmt(level["request_throughput_per_s"], 2),
        _fmt(level["mean_output_tokens"]),
        _fmt(level["ttft_ms"]["p50"]),
        _fmt(level["ttft_ms"]["p99"]),
        _fmt(level["tpot_ms"]["p50"], 2),
        _fmt(level["itl_ms"]["p50"], 2),
        _fmt(level["itl_ms"]["p99"], 2),
        _fmt(level["e2e_ms"]["p50"]),
        _fmt(level["e2e_ms"]["p99"]),
    ]
    return "| " + " | ".join(cells) + " |"


def table(levels: list[dict[str, Any]]) -> str:
    separator = "|" + "---:|" * TABLE_HEADER.count(" | ") + "---:|"
    return "\n".join([TABLE_HEADER, separator, *(table_row(level) for level in levels)])


def plot(series: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Output tok/s and TTFT p50 against concurrency, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (throughput, ttft) = plt.subplots(1, 2, figsize=(10, 4))
    for name, levels in series.items():
        xs = [level["concurrency"] for level in levels]
        throughput.plot(
            xs, [level["output_token_throughput_per_s"] or 0 for level in levels], marker="o", label=name
        )
        ttft.plot(xs, [level["ttft_ms"]["p50"] or 0 for level in levels], marker="o", label=name)
    for axis, title in ((throughput, "output tokens/s"), (ttft, "TTFT p50 (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    throughput.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
