"""Faster CPU inference: oneDNN matmuls on weights packed once at load time (as vLLM's CPU backend does),
and an allocator that keeps the memory of freed activations instead of handing it back each forward."""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Memory the packed copies may take, as a share of the memory available when the model is loaded.
MAX_SHARE_OF_AVAILABLE = 0.25
_BATCH_SIZE_HINT = 16  # oneDNN picks its blocking for about this many rows; any row count works
# Inputs of a few rows (decode steps of a few sequences) may run faster on the default BLAS call on the
# original weight than on the packed kernel, or slower: it depends on the CPU and its BLAS. The crossover is
# measured at load on the model's own linears (measure_kernels). bench-llama's decode step on 2 cores,
# medians of 3 rounds of benchmarks/linear_rows.py: on an Intel Xeon 1 row 6.4 ms default against 10.2
# packed, 4 rows 9.5 against 10.8, 16 rows 18.9 against 16.8; on an AMD EPYC (MKL's default call) 4 rows
# 42.4 against 23.4 ms.
CALIBRATION_ROWS = (1, 2, 4, 8, 16)
CALIBRATION_ROUNDS = 5  # the fastest of these rounds counts (other load only ever slows a round)
CALIBRATION_BUDGET_S = 2.0  # no further rounds after this long (large models), once two are done
CALIBRATION_BYTES = 256 * 2**20  # weights one timed pass reads: past a CPU's caches

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


def pack_linear_weights(
    model: Any, available_bytes: int | None = None, plain_max_rows: int | None = None
) -> int:
    """Run every float32 nn.Linear that lives on the CPU through oneDNN with a pre-packed weight.

    From a few rows up (decode steps of many sequences, prefills) packed weights are faster than the
    default BLAS call; sibling projections (SIBLINGS) share one packed weight. Inputs of at most
    `plain_max_rows` rows take the default call on the original weight instead; None: the crossover is
    measured now, on these linears (measure_kernels), since which call wins at a few rows depends on
    the CPU. The packed copy sits beside the original weight (tied and shared weights stay intact), so
    packing is skipped when the copies would take more than a quarter of the available memory. Returns
    the number of layers packed.
    """
    if not _available():
        logger.info("oneDNN linear kernels are unavailable in this torch build; using the default ones")
        return 0
    linears = [m for m in model.modules() if _packable(m)]
    if not linears:
        return 0
    packed_bytes = _weight_bytes(linears)
    if available_bytes is None:
        available_bytes = _available_memory_bytes()
    if packed_bytes > MAX_SHARE_OF_AVAILABLE * available_bytes:
        logger.info(
            "not packing CPU linear weights: %.1f GiB of copies > %d%% of %.1f GiB available",
            packed_bytes / 2**30, MAX_SHARE_OF_AVAILABLE * 100, available_bytes / 2**30,
        )  # fmt: skip
        return 0
    with torch.no_grad():
        units = _packed_units(model, linears)
    if plain_max_rows is None:
        timings = measure_kernels(_decode_first(model, units))
        plain_max_rows = crossover_rows(timings)
        measured = ", ".join(f"{n} rows {d * 1e3:.2f} / {p * 1e3:.2f}" for n, (d, p) in timings.items())
        logger.info(
            "CPU linear kernels: %s (measured, one pass over the linears, default / packed ms: %s)",
            f"the default call up to {plain_max_rows} rows, packed oneDNN above"
            if plain_max_rows
            else "packed oneDNN at every row count",
            measured,
        )
    for unit in units:
        unit.bind(plain_max_rows)
    fused = sum(len(u.linears) for u in units if u.siblings is not None)
    logger.info(
        "packed %d CPU linear layers for oneDNN (%d of them fused with their siblings, %.0f MiB)",
        len(linears), fused, packed_bytes / 2**20,
    )  # fmt: skip
    return len(linears)


def _packed_linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _by_rows(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: Callable[[torch.Tensor], torch.Tensor],
    plain_max_rows: int,
    x: torch.Tensor,
) -> torch.Tensor:
    """A few rows: the default call on the original weight; more: the packed kernel."""
    if x.numel() <= plain_max_rows * x.shape[-1]:
        return torch.nn.functional.linear(x, weight, bias)
    return packed(x)


@dataclass(frozen=True, slots=True)
class PackedUnit:
    """One packed product, a linear's or a sibling group's (computed as one), and the linears it serves."""

    linears: tuple[torch.nn.Linear, ...]
    weight: torch.Tensor  # packed for oneDNN
    bias: torch.Tensor | None
    siblings: _Siblings | None

    @classmethod
    def of(cls, linears: list[torch.nn.Linear]) -> PackedUnit:
        if len(linears) > 1:
            siblings = _Siblings(linears)
            return cls(tuple(linears), siblings.weight, siblings.bias, siblings)
        module = linears[0]
        weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), _BATCH_SIZE_HINT)
        return cls((module,), weight, module.bias, None)

    @property
    def in_features(self) -> int:
        return self.linears[0].weight.shape[1]

    @property
    def weight_bytes(self) -> int:
        return _weight_bytes(self.linears)

    def run_plain(self, x: torch.Tensor) -> None:
        for module in self.linears:
            torch.nn.functional.linear(x, module.weight, module.bias)

    def run_packed(self, x: torch.Tensor) -> None:
        _packed_linear(self.weight, self.bias, x)

    def bind(self, plain_max_rows: int) -> None:
        """Serve each linear: the default call up to `plain_max_rows` rows, this product above (a
        sibling group's product is made once and each sibling takes its slice)."""
        for index, module in enumerate(self.linears):
            if self.siblings is not None:
                packed = partial(self.siblings.output, index)
            else:
                packed = partial(_packed_linear, self.weight, self.bias)
            module.forward = partial(_by_rows, module.weight, module.bias, packed, plain_max_rows)


def _packed_units(model: Any, linears: list[torch.nn.Linear]) -> list[PackedUnit]:
    """The packed products for `linears`, in the model's order (a sibling group where its first is)."""
    groups = {id(group[0]): group for group in _sibling_groups(model)}
    fused = {id(m) for group in groups.values() for m in group}
    units = []
    for module in linears:
        if id(module) in groups:
            units.append(PackedUnit.of(groups[id(module)]))
        elif id(module) not in fused:
            units.append(PackedUnit.of([module]))
    return units


def _decode_first(model: Any, units: list[PackedUnit]) -> list[PackedUnit]:
    """`units` with those a decode step runs first (the text decoder's and the output projection's): an
    input of a few rows only ever reaches them, never a vision tower's, which sees whole images."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        return units
    if not isinstance(decoder, torch.nn.Module):  # an attribute of that name set to None
        return units
    decoding = {id(m) for m in decoder.modules()}
    output = getattr(model, "get_output_embeddings", lambda: None)()
    if output is not None:
        decoding.add(id(output))
    return sorted(units, key=lambda unit: id(unit.linears[0]) not in decoding)


@torch.inference_mode()
def measure_kernels(
    units: list[PackedUnit], rows: tuple[int, ...] = CALIBRATION_ROWS
) -> dict[int, tuple[float, float]]:
    """Seconds one pass over the units takes at each row count, on the default calls and on the packed
    kernels. A pass runs the units in the given order up to CALIBRATION_BYTES of weights, more than a
    CPU cache holds, so the weights are read from memory as in a forward (one weight timed again and
    again would sit in the cache). The two kinds alternate; each figure is the fastest of
    CALIBRATION_ROUNDS rounds (fewer once CALIBRATION_BUDGET_S is spent)."""
    passed, total_bytes = [], 0
    for unit in units:
        if passed and total_bytes >= CALIBRATION_BYTES:
            break
        passed.append(unit)
        total_bytes += unit.weight_bytes
    generator = torch.Generator().manual_seed(0)
    widths = {u.in_features for u in passed}
    inputs = {(n, w): torch.randn(n, w, generator=generator) for n in rows for w in widths}

    def one_pass(n: int, kind: int) -> float:
        begin = time.perf_counter()
        for unit in passed:
            (unit.run_plain, unit.run_packed)[kind](inputs[n, unit.in_features])
        return time.perf_counter() - begin

    for n in rows:
        for kind in (0, 1):
            one_pass(n, kind)  # lazy set-up (oneDNN's primitives per shape) done before timing
    best = {n: [float("inf"), float("inf")] for n in rows}
    started = time.perf_counter()
    for round_number in range(CALIBRATION_ROUNDS):
        if round_number >= 2 and time.perf_counter() - started > CALIBRATION_BUDGET_S:
            break
        for n in rows:
            for kind in ((0, 1), (1, 0))[round_number % 2]:
                best[n][kind] = min(best[n][kind], one_pass(n, kind))
    return {n: (plain, packed) for n, (plain, packed) in best.items()}


def crossover_rows(timings: dict[int, tuple[float, float]]) -> int:
    """The most rows up to which the default calls were faster at every measured row count (0: the
    packed kernel from one row on)."""
    most = 0
    for rows in sorted(timings):
        plain, packed = timings[rows]
        if plain >= packed:
            break
        most = rows
    return most


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
    all without a bias). Not a cross-attention's (Mllama's): its keys and values read the image states,
    its queries the text, so one product would compute keys and values a decode step throws away."""
    groups = []
    for module in model.modules():
        if "CrossAttention" in type(module).__name__:
            continue
        for names in SIBLINGS:
            children = [getattr(module, name, None) for name in names]
            if not all(isinstance(c, torch.nn.Linear) and _packable(c) for c in children):
                continue
            if len({c.in_features for c in children}) == 1 and len({c.bias is None for c in children}) == 1:
                groups.append(children)
    return groups


def _weight_bytes(linears: Iterable[torch.nn.Linear]) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in linears)


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
