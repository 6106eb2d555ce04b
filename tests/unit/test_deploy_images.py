"""Image requirement sets: the CUDA set agrees with the CPU set, its lock pins it, and each spec gets its set."""

from __future__ import annotations

from pathlib import Path

from shardbento.catalog import ModelSpec, load_spec
from shardbento.deploy.bento import image_for, read_requirements, requirements_file

ENV = Path(__file__).resolve().parents[2] / "env"


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in read_requirements(path):
        name, _, version = line.partition("==")
        pins[name.strip().lower()] = version.split(";")[0].strip()
    return pins


def test_deploy_images_cuda_set_pins_what_the_cpu_set_pins() -> None:
    cpu, cuda = _pins(ENV / "cpu.txt"), _pins(ENV / "cuda.txt")
    assert all(cpu.values()) and all(cuda.values())  # every line pinned
    assert {name: cuda.get(name) for name in cpu} == cpu


def test_deploy_images_cuda_lock_holds_the_cuda_pins_and_the_cuda_runtime() -> None:
    lock, cuda = _pins(ENV / "cuda.lock.txt"), _pins(ENV / "cuda.txt")
    assert {name: lock.get(name) for name in cuda} == cuda
    assert any(name.startswith("nvidia-nccl") for name in lock)  # PyPI's torch is the CUDA build


def test_deploy_images_image_for_picks_the_set_by_gpus() -> None:
    cpu_spec = load_spec("tiny-llama")
    gpu_spec = load_spec("llama-3.1-70b-instruct")
    assert requirements_file(cpu_spec) == "env/cpu.txt" and requirements_file(gpu_spec) == "env/cuda.lock.txt"
    gpu_image = image_for(gpu_spec)
    assert gpu_image.python_version == "3.11"
    assert any(line.startswith("nvidia-nccl") for line in gpu_image.python_requirements.splitlines())
    cpu_lines = image_for(cpu_spec).python_requirements.splitlines()
    assert "torch==2.13.0" in cpu_lines and not any(line.startswith("nvidia-") for line in cpu_lines)
    assert not any(line.startswith("bentoml==") for line in cpu_lines)  # BentoML adds its own pin


def test_deploy_images_image_for_a_one_gpu_spec_is_cuda() -> None:
    spec = ModelSpec(name="x", source="org/model", kind="text", gpus=1)
    assert requirements_file(spec) == "env/cuda.lock.txt"
