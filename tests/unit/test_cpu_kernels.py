"""CPU kernels: oneDNN-packed linears compute what plain ones do; glibc keeps freed activation memory."""

from __future__ import annotations

import functools
import logging
import subprocess
import sys

import pytest
import torch

from shardbento.engine.hf import cpu_kernels
from shardbento.engine.hf.cpu_kernels import pack_linear_weights

PROMPTS = ((5, 9, 14), tuple(range(20, 61)), (7, 8, 9, 10, 11, 12, 13))


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-4) and torch.equal(a.argmax(-1), b.argmax(-1))


@torch.inference_mode()
def test_cpu_kernels_packed_linears_keep_logits() -> None:
    from shardbento.catalog import load_spec
    from shardbento.engine.hf.loading import load_model
    from shardbento.plan.preflight import run_preflight

    spec = load_spec("tiny-llama").model_copy(update={"cpu_kernels": "default"})
    plain = load_model(spec, run_preflight(spec)).model
    assert not any(isinstance(m.forward, functools.partial) for m in plain.modules())
    ids = torch.tensor([PROMPTS[1]])
    reference = plain(input_ids=ids).logits
    linears = sum(type(m) is torch.nn.Linear for m in plain.modules())
    assert pack_linear_weights(plain, available_bytes=1) == 0  # copies would not fit: left alone
    assert pack_linear_weights(plain) == linears > 0
    assert close(plain(input_ids=ids).logits, reference)
    packed = [m.forward.args[2] for m in plain.modules() if isinstance(m.forward, functools.partial)]
    shared = [getattr(p.func, "__self__", None) for p in packed]
    groups = {id(s) for s in shared if isinstance(s, cpu_kernels._Siblings)}
    layers = plain.config.num_hidden_layers
    assert len(groups) == 2 * layers  # each layer's q/k/v and gate/up share one packed weight
    assert len([s for s in shared if s is not None]) == 5 * layers


@torch.inference_mode()
def test_cpu_kernels_a_few_rows_take_the_default_call_more_the_packed_kernel() -> None:
    """Up to plain_max_rows rows a packed linear is the default call on its own weight (the same
    numbers to the bit); past it the packed kernel serves (siblings computed as one product)."""
    from shardbento.catalog import load_spec
    from shardbento.engine.hf.loading import load_model
    from shardbento.plan.preflight import run_preflight

    spec = load_spec("tiny-llama").model_copy(update={"cpu_kernels": "default"})
    model = load_model(spec, run_preflight(spec)).model
    attention = model.model.layers[0].self_attn
    weights = {name: getattr(attention, name).weight for name in ("q_proj", "k_proj", "v_proj")}
    most = 4
    pack_linear_weights(model, plain_max_rows=most)
    siblings = attention.q_proj.forward.args[2].func.__self__
    hidden = model.config.hidden_size
    for rows in (1, most):
        x = torch.randn(1, rows, hidden, generator=torch.Generator().manual_seed(rows))
        assert torch.equal(attention.q_proj(x), torch.nn.functional.linear(x, weights["q_proj"]))
        assert getattr(siblings._pending, "input", None) is None  # no fused product made
    x = torch.randn(1, most + 1, hidden, generator=torch.Generator().manual_seed(0))
    q = attention.q_proj(x)
    assert siblings._pending.input is x  # the fused product, waiting for k and v
    for name, out in (("q_proj", q), ("k_proj", attention.k_proj(x)), ("v_proj", attention.v_proj(x))):
        assert torch.allclose(out, torch.nn.functional.linear(x, weights[name]), atol=1e-4)
    assert siblings._pending.input is None
    one = torch.tensor([[PROMPTS[0][0]]])
    reference = load_model(spec, run_preflight(spec)).model(input_ids=one).logits
    assert torch.equal(model(input_ids=one).logits, reference)  # a one-token forward: every linear plain


def test_cpu_kernels_crossover_is_the_last_row_count_the_default_call_won_from_one_up() -> None:
    assert cpu_kernels.crossover_rows({1: (1.0, 2.0), 2: (1.5, 2.0), 4: (3.0, 2.5), 8: (1.0, 9.0)}) == 2
    assert cpu_kernels.crossover_rows({1: (2.0, 1.0), 2: (1.0, 2.0)}) == 0  # packed from one row on
    assert cpu_kernels.crossover_rows({4: (1.0, 2.0), 1: (1.0, 2.0), 16: (1.0, 2.0)}) == 16
    assert cpu_kernels.crossover_rows({1: (2.0, 2.0)}) == 0  # a tie: the packed kernel


@torch.inference_mode()
def test_cpu_kernels_crossover_is_measured_at_load_and_every_linear_uses_it(caplog, monkeypatch) -> None:
    """Packing without a given crossover times the model's own linears on both calls at every
    calibration row count and binds what that timing chose into every packed linear; the load log
    names it with the figures."""
    from shardbento.catalog import load_spec
    from shardbento.engine.hf.loading import load_model
    from shardbento.plan.preflight import run_preflight

    spec = load_spec("tiny-llama").model_copy(update={"cpu_kernels": "default"})
    model = load_model(spec, run_preflight(spec)).model
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    units = [cpu_kernels.PackedUnit.of([m]) for m in linears]
    timings = cpu_kernels.measure_kernels(units, rows=(1, 3))
    assert set(timings) == {1, 3} and all(d > 0 and p > 0 for d, p in timings.values())
    measured, real = [], cpu_kernels.measure_kernels

    def measure(units):  # the real timing, then a table whose crossover no fixed default gives
        measured.append(real(units))
        return {1: (1.0, 2.0), 2: (1.0, 2.0), 4: (3.0, 2.0), 8: (1.0, 2.0)}

    monkeypatch.setattr(cpu_kernels, "measure_kernels", measure)
    with caplog.at_level(logging.INFO, logger=cpu_kernels.__name__):
        assert pack_linear_weights(model) == len(linears)
    assert set(measured[0]) == set(cpu_kernels.CALIBRATION_ROWS)
    assert {m.forward.args[3] for m in linears} == {2}
    assert (
        "the default call up to 2 rows" in caplog.text
        and "default / packed ms: 1 rows 1000.00" in caplog.text
    )
    ids = torch.tensor([PROMPTS[1]])
    reference = load_model(spec, run_preflight(spec)).model(input_ids=ids).logits
    assert close(model(input_ids=ids).logits, reference)


PREFILL_PAGE_FAULTS = """
import resource, sys, torch
import shardbento.engine.hf.loading as loading
from shardbento.catalog import ModelSpec
from shardbento.engine.batch.runner import ModelRunner, PrefillChunk
from shardbento.plan.preflight import run_preflight

if sys.argv[1] == "default":
    loading.keep_freed_memory = lambda: None
spec = ModelSpec.model_validate(
    {"name": "bench-llama", "source": "generated:bench-llama", "kind": "text", "dtype": "float32"}
)
runner = ModelRunner(loading.load_model(spec, run_preflight(spec)).model, 4, 1024)

def prefill(lengths):
    runner.release(list(range(runner.num_rows)))
    runner.prefill([PrefillChunk(i, tuple(range(10, 10 + n)), 0, i) for i, n in enumerate(lengths)])

def rounds():
    for i in range(8):
        prefill([120 + 7 * i, 130, 110 + i][: 1 + i % 3])

with torch.inference_mode():
    prefill([132, 120, 128])
    rounds()  # warm-up: every shape once (weights paged in, allocator pools grown)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):  # glibc's defaults fault again every round; one round gave as few as 6,000 here,
        rounds()  # against up to 3,000 one-off faults of a kept heap: too close for the 3 x below
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow  # a subprocess
def test_cpu_kernels_keep_freed_memory_stops_refaulting_prefill_pages() -> None:
    """The benchmark model's batched prefills, in fresh processes: glibc's defaults hand each forward's
    activation memory back and fault it in again; with keep_freed_memory (applied at load) they do not."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc settings apply on Linux only")
    from shardbento.tiny.models import ensure_generated

    ensure_generated("bench-llama")  # generated here, not inside the first measured process
    faults = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", PREFILL_PAGE_FAULTS, mode], capture_output=True, text=True, check=True
            ).stdout.split()[-1]
        )
        for mode in ("default", "keep")
    }
    assert faults["keep"] * 3 < faults["default"], faults


@torch.inference_mode()
def test_cpu_kernels_crossover_is_timed_on_the_decoders_linears_before_a_vision_towers(monkeypatch) -> None:
    """A vision model's tower comes first in its module order but never sees a few-row input: the
    timed pass starts with the text decoder's linears and the output projection, the tower's after."""
    from shardbento.catalog import load_spec
    from shardbento.engine.hf.loading import load_model
    from shardbento.plan.preflight import run_preflight

    spec = load_spec("tiny-llava").model_copy(update={"cpu_kernels": "default"})
    model = load_model(spec, run_preflight(spec)).model
    decoding = {id(m) for m in model.get_decoder().modules()} | {id(model.get_output_embeddings())}
    order = [id(m) in decoding for m in model.modules() if type(m) is torch.nn.Linear]
    assert not order[0] and any(order)  # the tower's linears first in the model's own order
    timed = []
    monkeypatch.setattr(cpu_kernels, "measure_kernels", lambda units: timed.extend(units) or {1: (2.0, 1.0)})
    pack_linear_weights(model)
    firsts = [id(unit.linears[0]) in decoding for unit in timed]
    assert firsts == sorted(firsts, reverse=True) and firsts[0] and not firsts[-1]
    assert id(model.get_output_embeddings()) in {id(u.linears[0]) for u in timed[: firsts.count(True)]}


@torch.inference_mode()
def test_cpu_kernels_a_cross_attentions_projections_are_packed_apart() -> None:
    """Mllama's cross-attention queries read the text, its keys and values the image states: its q/k/v
    are packed one by one (a decode step's query takes no key or value product), its self-attention's
    together."""
    from shardbento.catalog import load_spec
    from shardbento.engine.hf.loading import load_model
    from shardbento.plan.preflight import run_preflight

    spec = load_spec("tiny-mllama").model_copy(update={"cpu_kernels": "default"})
    model = load_model(spec, run_preflight(spec)).model
    pack_linear_weights(model, plain_max_rows=0)

    def shared(attention: torch.nn.Module) -> list[bool]:
        products = [getattr(attention, n).forward.args[2].func for n in ("q_proj", "k_proj", "v_proj")]
        return [isinstance(getattr(p, "__self__", None), cpu_kernels._Siblings) for p in products]

    text = [m for m in model.modules() if hasattr(m, "q_proj") and "Text" in type(m).__name__]
    cross = [m for m in text if "CrossAttention" in type(m).__name__]
    own = [m for m in text if m not in cross]
    assert cross and own
    assert all(shared(m) == [False] * 3 for m in cross) and all(shared(m) == [True] * 3 for m in own)


def test_cpu_kernels_nothing_to_pack_and_a_missing_decoder_are_no_trouble(caplog) -> None:
    class Model(torch.nn.Module):
        def get_decoder(self) -> None:  # transformers' lookup finds an attribute of that name set to None
            return None

    with caplog.at_level(logging.INFO, logger=cpu_kernels.__name__):
        assert pack_linear_weights(torch.nn.Embedding(4, 8)) == 0
    assert "CPU linear kernels" not in caplog.text  # nothing packable: nothing timed or chosen
    units = [
        cpu_kernels.PackedUnit.of([torch.nn.Linear(8, 4)]),
        cpu_kernels.PackedUnit.of([torch.nn.Linear(4, 8)]),
    ]
    assert cpu_kernels._decode_first(Model(), units) == units
