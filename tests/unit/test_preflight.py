"""Startup checks that fail before any weight loads; GPU-only checks skip without a GPU."""

from __future__ import annotations

import pytest

from shardbento.catalog import load_spec
from shardbento.plan.memory import PlanError


def test_preflight_tensor_size_not_dividing_heads_fails_before_loading() -> None:
    from shardbento.engine import create_engine

    spec = load_spec("tiny-llama-tp2").model_copy(update={"gpus": 3})
    with pytest.raises(PlanError, match=r"3 does not divide the 4 attention heads.*set gpus to one of \[2\]"):
        create_engine(spec)


def test_preflight_cpu_world_chooses_tensor_mode() -> None:
    from shardbento.plan.preflight import run_preflight

    assert run_preflight(load_spec("tiny-llama-tp2")).mode == "tensor"
    assert run_preflight(load_spec("tiny-llama")).mode == "single"


def test_preflight_more_gpus_than_visible_fails_with_fix() -> None:
    import torch

    from shardbento.plan.preflight import run_preflight

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    spec = load_spec("tiny-llama").model_copy(
        update={"gpus": visible + 1, "device": "cuda", "dtype": "float32"}
    )
    with pytest.raises(PlanError, match=rf"declares gpus: {visible + 1} but this process sees {visible} GPU"):
        run_preflight(spec)


@pytest.mark.gpu
def test_preflight_gpu_plan_and_arch_checks_pass_on_this_gpu() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    from shardbento.plan.preflight import run_preflight

    spec = load_spec("tiny-llama").model_copy(update={"gpus": 1, "device": "cuda"})
    plan = run_preflight(spec)
    assert plan.mode == "single" and plan.budget is not None
    assert plan.per_gpu_bytes()[0] < torch.cuda.get_device_properties(0).total_memory


def test_preflight_hub_model_without_its_gpus_fails_with_numbers_and_fix() -> None:
    import torch

    from shardbento.plan.preflight import run_preflight

    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    spec = load_spec("llama-3.1-70b-instruct")
    with pytest.raises(PlanError) as info:
        run_preflight(spec)
    message = str(info.value)
    assert f"gpus: {spec.gpus}" in message and "sees 0 GPU(s)" in message
    assert "CUDA_VISIBLE_DEVICES" in message
