"""benchmarks/gpu_recipe.py, the prepared GPU check: its CPU smoke mode runs the engine's own path end to
end in a subprocess that can import only what a lent GPU machine has (plus the wheels `make gpu-wheels`
carries there), so the script keeps working while no GPU is lent."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "benchmarks" / "gpu_recipe.py"
# The distributions the lent GPU machines' image holds (the device tool's KINDS.md, read 2026-11-17),
# and what env/gpu-check.txt carries there.
ON_THE_GPU_MACHINE = {
    "absl-py", "accelerate", "aiofiles", "aiohappyeyeballs", "aiohttp", "aiosignal", "annotated-doc",
    "anyio", "attrs", "botorch", "build", "certifi", "charset-normalizer", "chex", "click", "cloudpickle",
    "cmake", "colorama", "contourpy", "coverage", "cuda-bindings", "cuda-core", "cuda-pathfinder",
    "cuda-toolkit", "cupy-cuda13x", "cycler", "cython", "diffrax", "e3nn", "einops", "equinox", "etils",
    "execnet", "filelock", "flatbuffers", "flax", "fonttools", "formulaic", "frozenlist", "fsspec",
    "gpytorch", "grpcio", "h11", "h5py", "hf-xet", "httpcore", "httpx", "huggingface-hub", "humanize",
    "hypothesis", "idna", "imageio", "iniconfig", "interface-meta", "jax", "jax-cuda13-pjrt",
    "jax-cuda13-plugin", "jaxlib", "jaxtyping", "jinja2", "joblib", "kiwisolver", "lazy-loader",
    "lightning", "lightning-utilities", "linear-operator", "lineax", "llvmlite", "lxml", "markdown",
    "markdown-it-py", "markupsafe", "matplotlib", "mdurl", "meson", "ml-dtypes", "mpi4py", "mpmath",
    "msgpack", "multidict", "multipledispatch", "mypy-extensions", "nanobind", "narwhals", "networkx",
    "ninja", "numba", "numba-cuda", "numpy", "numpyro", "nvidia-cublas", "nvidia-cuda-cupti",
    "nvidia-cuda-nvrtc", "nvidia-cuda-runtime", "nvidia-cudnn-cu13", "nvidia-cufft", "nvidia-cufile",
    "nvidia-curand", "nvidia-cusolver", "nvidia-cusparse", "nvidia-cusparselt-cu13", "nvidia-ml-py",
    "nvidia-nccl-cu13", "nvidia-nvjitlink", "nvidia-nvshmem-cu13", "nvidia-nvtx", "onnx", "onnx-ir",
    "onnxruntime", "onnxscript", "opencv-python-headless", "optax", "opt-einsum", "opt-einsum-fx",
    "optimistix", "orbax-checkpoint", "packaging", "pandas", "pathspec", "patsy", "peft", "pillow", "pip",
    "pluggy", "portalocker", "prometheus-client", "propcache", "protobuf", "psutil", "pyarrow", "pybind11",
    "py-cpuinfo", "pygments", "pyparsing", "pyproject-hooks", "pyre-extensions", "pytest",
    "pytest-benchmark", "pytest-cov", "pytest-mock", "pytest-timeout", "pytest-xdist", "python-dateutil",
    "pytorch-lightning", "pyyaml", "regex", "requests", "rich", "sacrebleu", "safetensors",
    "scikit-build-core", "scikit-image", "scikit-learn", "scipy", "seaborn", "sentencepiece",
    "sentence-transformers", "setuptools", "shellingham", "simplejson", "six", "sortedcontainers",
    "statsmodels", "sympy", "tabulate", "tensorboard", "tensorboard-data-server", "tensorstore",
    "threadpoolctl", "tifffile", "tiktoken", "timm", "tokenizers", "toolz", "torch", "torchaudio",
    "torchdiffeq", "torch-geometric", "torchmetrics", "torchvision", "tqdm", "transformers", "treescope",
    "triton", "typer", "typing-extensions", "typing-inspect", "urllib3", "uvloop", "wadler-lindig",
    "werkzeug", "wheel", "wrapt", "xarray", "xxhash", "yarl", "zipp",
}  # fmt: skip
CARRIED = {"transformers", "pydantic", "pydantic-core", "annotated-types", "typing-inspection"}
LOCAL_ONLY = {"httpx2", "httpcore2", "truststore"}  # this huggingface-hub's (the GPU machine's uses httpx)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def blocked_packages() -> set[str]:
    """Every installed top-level package whose distribution the GPU machine does not have (bentoml,
    llguidance, bitsandbytes, starlette, ...)."""
    there = {_normal(name) for name in ON_THE_GPU_MACHINE | CARRIED | LOCAL_ONLY}
    return {
        top
        for top, dists in importlib.metadata.packages_distributions().items()
        if not any(_normal(dist) in there for dist in dists)
    }


def run_recipe(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """The recipe in a subprocess where importing anything the GPU machine lacks fails."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    blocked = sorted(blocked_packages())
    (site / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""
            import sys
            for name in {blocked!r}:
                sys.modules[name] = None  # import fails; importlib.util.find_spec says absent
            """
        )
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    command = [sys.executable, str(RECIPE), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


def test_gpu_recipe_blocks_what_the_gpu_machine_lacks() -> None:
    assert {"bentoml", "llguidance", "bitsandbytes"} <= blocked_packages()


@pytest.mark.slow  # a subprocess
def test_gpu_recipe_smoke_run_on_what_the_gpu_machine_has(tmp_path: Path) -> None:
    args = ["--device", "cpu", "--tiny", "--bandwidth-gbps", "20", "--concurrency", "3"]
    done = run_recipe(tmp_path, *args, "--input-tokens", "12", "--output-tokens", "6", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    assert report == json.loads((tmp_path / "gpu_recipe.json").read_text())
    assert report["device"] == "cpu" and report["bandwidth_gbps"] == 20.0
    assert report["batch1_decode_tok_s"] > 0
    assert report["concurrency_3_greedy_tok_s"] > 0 and report["concurrency_3_sampled_tok_s"] > 0
    limit = report["hbm_limit_tok_s"]
    assert abs(limit - 20e9 / (report["weight_gib"] * 2**30)) / limit < 0.05  # weight_gib is rounded
    assert abs(report["fraction_of_limit"] - report["batch1_decode_tok_s"] / limit) < 0.002
    assert report["packs"] and report["mixes"] and report["lean_decode"]  # the fast paths passed their checks
    assert len(report["self_checks"]) == 3 and all("best tokens agree" in c for c in report["self_checks"])
    assert report["kv_pool_tokens"] > 0
    mixed = report["mixed_step_vs_apart_ms"]
    assert mixed["mixed"] > 0 and mixed["decode_then_prefill"] > 0


@pytest.mark.slow  # a subprocess
def test_gpu_recipe_needs_a_bandwidth_for_an_unknown_device(tmp_path: Path) -> None:
    result = run_recipe(tmp_path, "--device", "cpu", "--tiny")
    assert result.returncode == 2 and "--bandwidth-gbps" in result.stderr


def recipe_module():
    spec = importlib.util.spec_from_file_location("gpu_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_recipe_bandwidth_lookup_prefers_the_specific_name() -> None:
    recipe = recipe_module()
    assert recipe.bandwidth_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert recipe.bandwidth_gbps("NVIDIA H100 PCIe") == 2000.0
    assert recipe.bandwidth_gbps("NVIDIA H200") == 4800.0
    assert recipe.bandwidth_gbps("NVIDIA A100-SXM4-80GB") == 2039.0
    assert recipe.bandwidth_gbps("cpu") is None
