"""The load-time checks' verdict: rounding of other kernels passes, a wrong path fails."""

from __future__ import annotations

import torch

from shardbento.engine.batch.selfcheck import agreement, tolerance_for


def logits(seed: int, rows: int = 3, vocab: int = 50) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 8


def test_selfcheck_bf16_rounding_of_one_logit_passes_where_elementwise_would_not() -> None:
    """bf16 kernels of another shape: a near-zero logit off by 0.25 (four times an elementwise 0.0625)
    while the spread is ~60: the same distribution, so the fast path stays on."""
    plain = logits(0).bfloat16()
    plain[1, 7] = 0.0  # a near-zero logit: an elementwise tolerance allows it almost nothing
    fast = plain.clone()
    fast[1, 7] = 0.25
    assert not torch.allclose(fast.float(), plain.float(), atol=0.0625, rtol=0.0625)
    check = agreement(fast, plain)
    assert check.ok, check.describe()
    assert check.tolerance == tolerance_for(torch.bfloat16)


def test_selfcheck_wrong_rows_fail() -> None:
    plain = logits(1)
    check = agreement(plain.flip(0), plain)  # each row got another row's logits
    assert not check.ok and not check.top_agree
    assert "DIFFER" in check.describe()


def test_selfcheck_small_drift_beyond_the_dtype_fails_in_float32() -> None:
    plain = logits(2)
    check = agreement(plain + 0.01 * logits(3), plain)  # top tokens may agree; values are off
    assert not check.ok


def test_selfcheck_values_only_and_shape_mismatch() -> None:
    keys = torch.randn(1, 2, 6, 8, generator=torch.Generator().manual_seed(4))
    assert agreement(keys + 1e-7, keys, top_k=0).ok
    assert not agreement(keys[:, :, :5], keys, top_k=0).ok


def test_selfcheck_worst_keeps_the_larger_relative_difference() -> None:
    plain = logits(5)
    small, large = agreement(plain + 1e-6, plain), agreement(plain + 0.05, plain)
    assert small.worst(large).max_diff == large.max_diff == small.worst(large).max_diff
    assert not small.worst(large).ok and small.worst(small).ok
