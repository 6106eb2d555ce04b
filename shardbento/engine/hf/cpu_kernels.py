"""Faster CPU inference: oneDNN matmuls on weights packed once at load time (as vLLM's CPU backend does),
and an allocator that keeps the memory of freed activations instead of handing it back each forward."""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Memory the packed copies may take, as a share of the memory available when the model is loaded.
MAX_SHARE_OF_AVAILABLE = 0.25
_BATCH_SIZE_HINT = 16  # oneDNN picks its blocking for about this many rows; any row count works
# Inputs of at most this many rows (decode steps of a few sequences) go to the default BLAS call on the
# original weight, which beats the packed kernel there. bench-llama's decode step on 2 cores (medians of
# 3 rounds, benchmarks/linear_rows.py): 1 row 6.4 ms default against 10.2 packed, 4 rows 9.5 against
# 10.8, 8 rows 12.3 against 13.0, 16 rows 18.9 against 16.8.
PLAIN_MAX_ROWS = 4

# glibc mallopt() parameters and the values keep_freed_memory() sets (see its docstring).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int
TOP_PAD_BYTES = 256 * 1024 * 1024  # address space reserved ahead; pages count only once touched


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse the memory of freed activation tensors instead of returning it.

    With glibc's defaults, large blocks (a prefill's activations) are mmapped and unmapped on free, and
    a heap whose free top grows past the trim threshold is trimmed, so the engine thread's prefills
    re-fault and re-zero their pages each forward: ~1.5 GB of page faults per 6,000 generated tokens on
    the benchmark model, ~14% of every prefill's time.
    Served from the heap and kept there, the pages are faulted once (vLLM's CPU backend gets the same
    from tcmalloc). The process keeps its peak activation memory after a burst. Returns False where the
    C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    settings = (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (_M_TOP_PAD, TOP_PAD_BYTES),
    )
    applied = all(mallopt(param, value) == 1 for param, value in settings)
    logger.info("malloc keeps freed CPU memory for reuse: %s", "yes" if applied else "no (mallopt refused)")
    return applied


# Projections that read the same input: attention's q/k/v and a gated MLP's gate/up. Packed as one weight,
# the input is multiplied once (vLLM's fused QKV and gate-up linears): fewer, wider oneDNN calls.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def pack_linear_weights(model: Any, available_bytes: int | None = None) -> int:
    """Run every float32 nn.Linear that lives on the CPU through oneDNN with a pre-packed weight.

    From a few rows up (decode steps of many sequences, prefills) packed weights are faster than the
    default BLAS call on this kind of CPU; sibling projections (SIBLINGS) share one packed weight. Up to
    PLAIN_MAX_ROWS rows the default call on the original weight is faster and serves. The packed copy
    sits beside the original weight (tied and shared weights stay intact), so packing is skipped when
    the copies would take more than a quarter of the available memory. Returns the number of layers
    packed.
    """
    if not _available():
        logger.info("oneDNN linear kernels are unavailable in this torch build; using the default ones")
        return 0
    linears = [m for m in model.modules() if _packable(m)]
    packed_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    if available_bytes is None:
        available_bytes = _available_memory_bytes()
    if packed_bytes > MAX_SHARE_OF_AVAILABLE * available_bytes:
        logger.info(
            "not packing CPU linear weights: %.1f GiB of copies > %d%% of %.1f GiB available",
            packed_bytes / 2**30, MAX_SHARE_OF_AVAILABLE * 100, available_bytes / 2**30,
        )  # fmt: skip
        return 0
    with torch.no_grad():
        fused = {id(m) for group in _sibling_groups(model) for m in _fuse(group)}
        for module in (m for m in linears if id(m) not in fused):
            weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), _BATCH_SIZE_HINT)
            module.forward = partial(
                _by_rows, module.weight, module.bias, partial(_packed_linear, weight, module.bias)
            )
    logger.info(
        "packed %d CPU linear layers for oneDNN (%d of them fused with their siblings, %.0f MiB)",
        len(linears), len(fused), packed_bytes / 2**20,
    )  # fmt: skip
    return len(linears)


def _packed_linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _by_rows(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
) -> torch.Tensor:
    """A few rows: the default call on the original weight; more: the packed kernel."""
    if x.numel() <= PLAIN_MAX_ROWS * x.shape[-1]:
        return torch.nn.functional.linear(x, weight, bias)
    return packed(x)


class _Siblings:
    """Linears that read the same input, computed as one: the first call with an input multiplies it by
    the packed concatenation of their weights, and each sibling then takes its own slice of that
    product once; a call with another input (or a slice already taken) computes afresh. The product
    waiting for its siblings is per thread (two threads may run one model: tensor-parallel unit tests)."""

    def __init__(self, linears: list[torch.nn.Linear]) -> None:
        weight = torch.cat([m.weight.detach() for m in linears])
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, _BATCH_SIZE_HINT)
        biases = [m.bias for m in linears]
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        self.sizes = [m.out_features for m in linears]
        self._pending = threading.local()  # .input and .outputs: the last product and its untaken slices

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        pending = self._pending
        outputs = getattr(pending, "outputs", None)
        if x is not getattr(pending, "input", None) or outputs[index] is None:
            pending.input = x
            pending.outputs = outputs = list(
                _packed_linear(self.weight, self.bias, x).split(self.sizes, dim=-1)
            )
        out, outputs[index] = outputs[index], None
        if all(o is None for o in outputs):
            pending.input = None  # every slice taken: hold no activation between forwards
        return out


def _sibling_groups(model: Any) -> list[list[torch.nn.Linear]]:
    """Each module's SIBLINGS children that can share a packed weight (same input width, all with or
    all without a bias)."""
    groups = []
    for module in model.modules():
        for names in SIBLINGS:
            children = [getattr(module, name, None) for name in names]
            if not all(isinstance(c, torch.nn.Linear) and _packable(c) for c in children):
                continue
            if len({c.in_features for c in children}) == 1 and len({c.bias is None for c in children}) == 1:
                groups.append(children)
    return groups


def _fuse(linears: list[torch.nn.Linear]) -> list[torch.nn.Linear]:
    siblings = _Siblings(linears)
    for index, module in enumerate(linears):  # a few rows: each its own default call, no product kept
        module.forward = partial(_by_rows, module.weight, module.bias, partial(siblings.output, index))
    return linears


def _packable(module: Any) -> bool:
    return (
        type(module) is torch.nn.Linear
        and module.weight.device.type == "cpu"
        and module.weight.dtype == torch.float32
        and not hasattr(module, "_hf_hook")  # accelerate offload hooks move weights in and out
    )


def _available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _available_memory_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)
