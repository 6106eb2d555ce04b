"""How a mixed step's LoRA deltas are computed: every held adapter's A at once with a per-token mask (what
engine/lora/layer.py does) against gathering each adapter's tokens (punica/S-LoRA's grouping, one
matmul pair per adapter). Prints the time per linear for decode and prefill shapes on this machine.

    .venv/bin/python benchmarks/lora_delta.py
"""

from __future__ import annotations

import time
from functools import partial

import torch

from shardbento.engine.lora.layer import StepLora


def masked(step: StepLora, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((x @ a.t()) * step.mask(x.device, x.dtype)) @ b


def grouped(
    groups: list[tuple[int, torch.Tensor]], x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rank: int
) -> torch.Tensor:
    out = torch.zeros(x.shape[0], b.shape[1])
    for slot, index in groups:
        rows = slice(slot * rank, (slot + 1) * rank)
        out.index_add_(0, index, (x.index_select(0, index) @ a[rows].t()) @ b[rows])
    return out


def timed(fn, repeat: int = 200) -> float:
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e6


def main() -> None:
    torch.manual_seed(0)
    print(
        "| shape (in x out) | tokens | adapters (+ base) | rank | mask, us | grouped, us | base linear, us |"
    )
    print("|---|---|---|---|---|---|---|")
    for width, out_width in ((256, 512), (512, 1408), (4096, 4096)):
        for tokens in (16, 256):
            for num_slots, rank in ((4, 16), (16, 16)):
                slots = [(i % (num_slots + 1)) - 1 for i in range(tokens)]  # base and every adapter
                step = StepLora.of(slots, rank, num_slots)
                x = torch.randn(tokens, width)
                a = torch.randn(num_slots * rank, width)
                b = torch.randn(num_slots * rank, out_width)
                weight = torch.randn(out_width, width)
                index = torch.tensor(slots)
                groups = [(s, (index == s).nonzero().flatten()) for s in range(num_slots)]
                assert torch.allclose(masked(step, x, a, b), grouped(groups, x, a, b, rank), atol=1e-2)
                row = (
                    timed(partial(masked, step, x, a, b)),
                    timed(partial(grouped, groups, x, a, b, rank)),
                    timed(partial(torch.matmul, x, weight.t())),
                )
                print(
                    f"| {width} x {out_width} | {tokens} | {num_slots} | {rank} | "
                    + " | ".join(f"{v:.0f}" for v in row)
                    + " |"
                )


if __name__ == "__main__":
    with torch.inference_mode():
        main()
