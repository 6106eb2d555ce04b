"""The load-time checks of the fast paths on the loaded model (packed prefill, mixed steps with a chunk
growing in its pool row): their outputs against the plain path's, and the verdict's measure."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from shardbento.engine.batch import packed

logger = logging.getLogger(__name__)

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


def checked_on(
    runner: Any, compare: Callable[[], list[Agreement]], what: str, verdicts: tuple[str, str]
) -> bool:
    """A load-time check that drives `runner`: the agreements `compare` measures (a check that raises
    fails: the plain path serves), the runner's rows released after, and one INFO line `what` with the
    verdict (`verdicts`: yes, no) and the measure."""
    try:
        check = functools.reduce(Agreement.worst, compare())
        ok, why = check.ok, check.describe()
    except Exception as exc:  # noqa: BLE001 - a model the fast path does not fit: the plain path serves
        ok, why = False, f"the check failed: {type(exc).__name__}: {exc}"
    finally:
        runner.release(list(range(runner.num_rows)))
    logger.info(what, verdicts[0] if ok else verdicts[1], why)
    return ok


def enable_packing(model: Any) -> bool:
    """Switch a text model's SDPA attention to the packed-capable one and check, on the model, that two
    prompts packed (one continuing from a cached prefix) give each prompt's own logits and keys; on any
    difference the model keeps its attention and is never packed. Sliding-window models and vision
    models other than packed.PACKED_VISION_TYPES are left alone."""
    config = model.config
    if (
        getattr(config, "_attn_implementation", None) not in ("sdpa", packed.ATTENTION)
        or packed.windowed(config)
        or packed.vision(config)
    ):
        return False
    packed._register()
    why = ""
    try:
        model.set_attn_implementation(packed.ATTENTION)
        check = _packs_right(model)
        ok, why = check is not None and check.ok, check.describe() if check else "the attention was bypassed"
    except Exception as exc:  # noqa: BLE001 - an unexpected model: it keeps its own attention
        ok, why = False, f"the check failed: {type(exc).__name__}: {exc}"
    if not ok:
        with contextlib.suppress(Exception):
            model.set_attn_implementation("sdpa")
    logger.info(
        "prompts prefilled together: %s (packed against one-by-one on this model: %s)",
        "packed in one row" if ok else "left-padded",
        why,
    )
    return ok


def _packs_right(model: Any) -> Agreement | None:
    """Two prompts packed (one continuing from a cached prefix) against each prompt's own forward:
    logits and keys; None when some layer's attention did not come through the registry."""
    from transformers import DynamicCache

    from shardbento.engine.hf.placement import hidden_states_device, input_device

    device, hidden = input_device(model), hidden_states_device(model)
    prompts = [list(range(3, 12)), list(range(20, 26))]  # the second continues from 4 cached tokens
    alone = []
    for ids in prompts:
        cache = DynamicCache(config=model.config)
        out = model(input_ids=torch.tensor([ids], device=device), past_key_values=cache, use_cache=True)
        alone.append((out.logits[0, -1], cache))
    cached = 4
    rows = packed.PackedRows.of([0, cached], [len(prompts[0]), len(prompts[1]) - cached])
    cache = DynamicCache(config=model.config)
    for layer_idx, layer in enumerate(alone[1][1].layers):
        if _holds_keys(layer):  # a cross-attention layer a text prompt skipped holds none
            cache.update(layer.keys[:, :, :cached], layer.values[:, :, :cached], layer_idx)
    ids = prompts[0] + prompts[1][cached:]
    packed._local.calls = 0
    with packed.packed_rows(rows):
        out = model(
            input_ids=torch.tensor([ids], device=device),
            position_ids=rows.positions()[None].to(device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=rows.last_tokens().to(hidden),
        )
    if packed._local.calls != sum(1 for layer in cache.layers if _holds_keys(layer)):
        return None  # some layer's attention bypassed the registry (a cross-attention layer holds none)
    checks = []
    for row, (logits, own) in enumerate(alone):
        keys = torch.cat([cache.layers[0].keys[:, :, at : at + n] for at, n in rows.spans(row)], dim=2)
        checks += [agreement(out.logits[0, row], logits), agreement(keys, own.layers[0].keys, top_k=0)]
    return functools.reduce(Agreement.worst, checks)


def _holds_keys(layer: Any) -> bool:
    keys = getattr(layer, "keys", None)
    return keys is not None and keys.numel() > 0


def mixes_right(runner: Any) -> bool:
    """Whether mixed steps give the logits that decode steps and prefills give apart, on this model:
    with a complete prompt, and with a long prompt's chunks growing in its pool row (the decode half
    needs the attention layers' own layer_idx). Logged at INFO with the measured difference."""
    from shardbento.engine.batch.prefill import PrefillChunk

    first, second, long = tuple(range(3, 12)), tuple(range(20, 26)), tuple(range(30, 50))

    def compare() -> list[Agreement]:
        runner.prefill([PrefillChunk(-1, first, 0, 0)])
        apart = [runner.decode([token]) for token in (5, 7, 9)]
        runner.release([0])
        alone = runner.prefill([PrefillChunk(-2, second, 0, 0)])
        runner.release([0])
        whole = runner.prefill([PrefillChunk(-3, long, 0, 0)])
        runner.release([0])
        runner.prefill([PrefillChunk(-1, first, 0, 0)])
        prompt, decoded = runner.mixed([PrefillChunk(-2, second, 0, 1)], [5])
        runner.release([1])
        _, chunk_decoded = runner.mixed([PrefillChunk(-3, long[:8], 0, None, length=len(long))], [7])
        rest, last_decoded = runner.mixed([PrefillChunk(-3, long[8:], 8, 1, length=len(long))], [9])
        return [
            agreement(decoded, apart[0]),
            agreement(prompt, alone),
            agreement(chunk_decoded, apart[1]),
            agreement(last_decoded, apart[2]),
            agreement(rest, whole),
        ]

    return checked_on(  # e.g. attention modules without layer_idx fail it: no mixed steps
        runner,
        compare,
        "running sequences decode in the prompts' forward (mixed steps, chunks included): %s (mixed "
        "against decode and prefill apart on this model: %s)",
        ("yes", "no"),
    )


def decodes_lean(runner: Any) -> bool:
    """Switch `runner` to the lean decode forward (lean.py) when the model is one it runs and, on this
    model, three decode steps of two rows of different lengths give the plain forward's logits; else the
    plain forward serves (runner.lean None). Logged at INFO with why or the measured difference."""
    from shardbento.engine.batch.lean import LeanDecode, why_not_lean
    from shardbento.engine.batch.prefill import PrefillChunk

    runner.lean = None
    why = why_not_lean(runner.model)
    if why is not None:
        logger.info("decode steps: the model's own forward (%s)", why)
        return False
    prompts = [PrefillChunk(-1, tuple(range(3, 12)), 0, 0), PrefillChunk(-2, tuple(range(20, 26)), 0, 1)]

    def steps() -> torch.Tensor:
        runner.prefill(prompts)
        logits = torch.stack([runner.decode(tokens) for tokens in ([5, 6], [7, 8], [9, 10])])
        runner.release([0, 1])
        return logits

    def compare() -> list[Agreement]:
        plain = steps()
        runner.lean = LeanDecode(runner.model)
        return [agreement(steps(), plain)]

    ok = checked_on(
        runner,
        compare,
        "decode steps: %s (against the model's own forward on this model: %s)",
        ("the lean forward, without the modeling code's wrappers", "the model's own forward"),
    )
    if not ok:
        runner.lean = None
    return ok
