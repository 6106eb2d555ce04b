"""Startup checks that fail before any weight loads; GPU-only checks skip without a GPU."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from shardbento.catalog import load_spec
from shardbento.plan.cuda import (
    CUDA12_TORCH_INDEX,
    capability_refusal,
    driver_refusal,
    driver_version,
    lock_cuda,
)
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
    assert "this torch is a CPU build" in message


def _torch_built_for(cuda: str, visible: int = 0) -> SimpleNamespace:
    """What preflight reads of torch: its CUDA version and what it sees (here: nothing)."""
    return SimpleNamespace(
        version=SimpleNamespace(cuda=cuda),
        cuda=SimpleNamespace(is_available=lambda: visible > 0, device_count=lambda: visible),
    )


def test_preflight_old_driver_is_named_with_its_floor_before_blaming_visibility(monkeypatch) -> None:
    """A CUDA 13 torch on a 550 driver (CUDA 12.4) sees no GPU: the message names the driver floor and the
    CUDA 12 wheel index, not CUDA_VISIBLE_DEVICES."""
    from shardbento.plan import preflight

    monkeypatch.setattr(preflight, "driver_cuda", lambda: (12, 4))
    monkeypatch.setattr(preflight, "driver_version", lambda: "550.54.14")
    spec = load_spec("tiny-llama").model_copy(update={"gpus": 1, "device": "cuda"})
    with pytest.raises(PlanError) as info:
        preflight._check_gpus(spec, _torch_built_for("13.0"))
    message = str(info.value)
    assert "CUDA 13.0 build, which needs an NVIDIA driver >= 580.65.06" in message
    assert "driver 550.54.14 supports CUDA 12.4 only" in message
    assert f"make cuda-lock TORCH_INDEX={CUDA12_TORCH_INDEX}" in message
    assert "CUDA_VISIBLE_DEVICES" not in message
    monkeypatch.setattr(preflight, "driver_cuda", lambda: None)  # no driver in the container at all
    with pytest.raises(PlanError, match="no NVIDIA driver is loaded .* --gpus all"):
        preflight._check_gpus(spec, _torch_built_for("13.0"))


@pytest.mark.parametrize(
    ("build", "supported", "refused"),
    [((13, 0), (12, 4), True), ((13, 0), (13, 1), False), ((12, 8), (12, 2), False), ((12, 8), None, False)],
)
def test_preflight_driver_refusal_by_cuda_major(build, supported, refused) -> None:
    assert (driver_refusal(build, supported, None) is not None) == refused


def test_preflight_gpu_kinds_a_cuda_build_cannot_drive_are_refused_by_name() -> None:
    v100 = capability_refusal("nvidia-tesla-v100", (7, 0), (13, 0))
    assert v100 and "compute capability 7.0" in v100 and "CUDA 12 wheels" in v100
    assert capability_refusal("nvidia-tesla-t4", (7, 5), (13, 0)) is None
    assert capability_refusal("nvidia-tesla-v100", (7, 0), (12, 8)) is None
    k80 = capability_refusal("nvidia-tesla-k80", (3, 7), (13, 0))
    assert k80 and "CUDA 12 wheels" not in k80  # a CUDA 12 build would not drive it either


def test_preflight_reads_the_cuda_version_a_lock_installs_and_the_driver_version(tmp_path) -> None:
    env = Path(__file__).resolve().parents[2] / "env"
    assert lock_cuda(env / "cuda.lock.txt") == lock_cuda(env / "vllm-cuda.lock.txt") == (13, 0)
    (tmp_path / "cu12.txt").write_text("nvidia-cuda-runtime-cu12==12.8.90\n")
    assert lock_cuda(tmp_path / "cu12.txt") == (12, 8)
    proc = tmp_path / "version"
    proc.write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024\n"
    )
    assert driver_version(proc) == "550.54.14"
    assert driver_version(tmp_path / "missing") is None
