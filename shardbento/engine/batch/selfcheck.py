"""The load-time checks' verdict: a fast path's outputs against the plain path's on the loaded model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOP_K = 5  # each row's best token must be among the other path's best TOP_K


@dataclass(frozen=True, slots=True)
class Agreement:
    """How far a fast path's outputs are from the plain path's.

    A difference is measured against the plain outputs' spread (largest minus smallest value), not
    elementwise: bfloat16 kernels of different shapes sum in different orders, and one near-zero logit
    can then differ by more than any absolute or elementwise tolerance while the distribution is the
    same. A wrong path (attention to the wrong tokens, a missing layer) moves logits by a large share of
    their spread and changes the best tokens, so both tests catch it.
    """

    max_diff: float
    spread: float
    tolerance: float  # allowed max_diff as a share of the spread
    top_agree: bool

    @property
    def ok(self) -> bool:
        return self.top_agree and self.max_diff <= self.tolerance * max(self.spread, 1e-12)

    def describe(self) -> str:
        share = self.max_diff / max(self.spread, 1e-12)
        return (
            f"max difference {self.max_diff:.3g} = {share:.3g} of the spread {self.spread:.3g} "
            f"(tolerance {self.tolerance:.3g}), best tokens {'agree' if self.top_agree else 'DIFFER'}"
        )

    def worst(self, other: Agreement) -> Agreement:
        """The two checks as one: the larger relative difference, both top-token verdicts."""
        mine, theirs = self.max_diff / max(self.spread, 1e-12), other.max_diff / max(other.spread, 1e-12)
        base = self if mine >= theirs else other
        return Agreement(base.max_diff, base.spread, base.tolerance, self.top_agree and other.top_agree)


def tolerance_for(dtype: torch.dtype) -> float:
    """Rounding of a different summation order, as a share of the spread: a few units of the dtype's
    precision (float32: 1e-4; bfloat16: 0.0625; float16: 0.0078)."""
    return max(1e-4, 8 * torch.finfo(dtype).eps)


def agreement(fast: torch.Tensor, plain: torch.Tensor, top_k: int = TOP_K) -> Agreement:
    """Compare two tensors of the same shape; `top_k` > 0 treats the last dimension as a vocabulary and
    asks each row's argmax to be among the other's top_k (0: values only, e.g. keys)."""
    if fast.shape != plain.shape:
        return Agreement(float("inf"), 0.0, 0.0, False)
    a, b = fast.float(), plain.float()
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    spread = float(b.max() - b.min()) if b.numel() else 0.0
    agree = True
    if top_k and a.numel():
        k = min(top_k, a.shape[-1])
        rows_a, rows_b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        best_a, best_b = rows_a.argmax(-1), rows_b.argmax(-1)
        top_a, top_b = rows_a.topk(k, dim=-1).indices, rows_b.topk(k, dim=-1).indices
        agree = bool(((top_b == best_a[:, None]).any(-1) & (top_a == best_b[:, None]).any(-1)).all())
    return Agreement(diff, spread, tolerance_for(fast.dtype), agree)
