"""A built Bento is self-contained: a fresh venv from its own requirements serves it from the store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from servers import Server, free_port, stop, wait_ready

from shardbento.catalog import load_spec
from shardbento.deploy.bento import bento_labels, read_requirements

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny-llama"


def _env(bentoml_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "true"}


def _build(model: str, env: dict[str, str]) -> tuple[str, Path]:
    command = [sys.executable, "-m", "shardbento", "bento", model]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    tag = done.stdout.strip().splitlines()[-1]
    name, version = tag.split(":")
    return tag, Path(env["BENTOML_HOME"]) / "bentos" / name / version


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, dict[str, str]]:
    """`python -m shardbento bento tiny-llama` into a private Bento store."""
    env = _env(tmp_path_factory.mktemp("bentoml-home"))
    tag, path = _build(MODEL, env)
    return tag, path, env


def test_bento_of_a_gpu_auto_entry_carries_vllm_and_its_lock(tmp_path: Path) -> None:
    """A GPU entry left at engine: auto whose architecture vLLM implements is built (offline: generated
    weights) with vLLM's CUDA set in its image, and the Bento includes that set and its lock."""
    catalog = tmp_path / "catalog"
    shutil.copytree(REPO / "models", catalog)
    entry = {"source": "generated:tiny-llama", "kind": "text", "gpus": 1, "gpu_type": "nvidia-h100-80gb"}
    (catalog / "tiny-llama-gpu.yaml").write_text(yaml.safe_dump(entry))
    env = {**_env(tmp_path / "bentoml-home"), "SHARDBENTO_CATALOG": str(catalog)}
    _, path = _build("tiny-llama-gpu", env)
    installs = set(read_requirements(path / "env" / "python" / "requirements.txt"))
    assert set(read_requirements(REPO / "env" / "vllm-cuda.lock.txt")) - {"bentoml==1.4.39"} <= installs
    assert "vllm==0.32.0" in installs and any(line.startswith("nvidia-nccl") for line in installs)
    info = yaml.safe_load((path / "bento.yaml").read_text())
    assert info["labels"]["engine"] == "auto" and info["services"][0]["config"]["resources"]["gpu"] == 1
    for name in ("vllm-cuda.txt", "vllm-cuda.lock.txt"):
        assert (path / "src" / "env" / name).is_file()
    assert (path / "src" / "models" / "tiny-llama-gpu.yaml").is_file()  # the catalog it was built from


def test_bento_yaml_carries_resources_labels_and_args(built) -> None:
    tag, path, _ = built
    spec = load_spec(MODEL)
    info = yaml.safe_load((path / "bento.yaml").read_text())
    assert f"{info['name']}:{info['version']}" == tag and info["name"] == f"shardbento-{MODEL}"
    assert info["args"] == {"model": MODEL}
    assert bento_labels(spec).items() <= info["labels"].items()
    assert info["services"][0]["config"]["resources"] == spec.resources()
    assert info["image"]["python_version"] == "3.11"
    assert (path / "src" / "service.py").is_file() and (path / "src" / "models" / f"{MODEL}.yaml").is_file()
    assert not list((path / "src").glob(".venv*")) and not (path / "src" / "tests").exists()
    pins = set(read_requirements(REPO / "env" / "cpu.txt"))
    assert pins <= set(read_requirements(path / "env" / "python" / "requirements.txt"))


def test_bento_serves_from_the_store_in_a_fresh_venv(built, tmp_path: Path) -> None:
    tag, path, env = built
    venv = tmp_path / "venv"
    # uv, as in BentoML's own image build; a local wheel folder configured for pip serves uv too.
    uv = str(Path(sys.executable).parent / "uv")
    find_links = env.get("UV_FIND_LINKS") or env.get("PIP_FIND_LINKS")
    uv_env = {**env, **({"UV_FIND_LINKS": find_links} if find_links else {})}
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True, timeout=120)
    requirements = str(path / "env" / "python" / "requirements.txt")
    install = [uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), "-r", requirements]
    done = subprocess.run(install, env=uv_env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    port = free_port()
    log_path = tmp_path / "serve.log"
    command = [str(venv / "bin" / "bentoml"), "serve", tag, "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:  # cwd is not the repo: only the Bento's own copy can be imported
        process = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    try:
        wait_ready(server, timeout_s=240)
        body = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}
        answer = httpx.post(f"{server.url}/chat", json=body, timeout=120).json()
        assert answer["model"] == MODEL and answer["usage"]["completion_tokens"] >= 1
        card = httpx.post(f"{server.url}/models", json={}, timeout=30).json()
        assert card["name"] == MODEL and card["ready"]
        workers = [
            p
            for p in psutil.Process(process.pid).children(recursive=True)
            if "worker" in " ".join(p.cmdline())
        ]
        # the service runs from the Bento's own copy of the code, not from this checkout
        assert workers and {os.path.realpath(p.cwd()) for p in workers} == {os.path.realpath(path / "src")}
    finally:
        stop(process)


def test_bento_of_an_entry_with_adapters_carries_them(tmp_path: Path) -> None:
    """A local LoRA adapter is copied into the Bento's catalog and its entry points there; a hub adapter
    is declared to BentoML as the hub weights are (a model of the service, baked into the Bento)."""
    from shardbento.tiny.lora import ensure_adapter

    catalog = tmp_path / "catalog"
    shutil.copytree(REPO / "models", catalog)
    adapter = ensure_adapter("tiny-llama-lora-a")
    entry = {"source": "generated:tiny-llama", "kind": "text", "lora_adapters": {"mine": str(adapter)}}
    (catalog / "tiny-llama-mine.yaml").write_text(yaml.safe_dump(entry))
    env = {**_env(tmp_path / "bentoml-home"), "SHARDBENTO_CATALOG": str(catalog)}
    _, path = _build("tiny-llama-mine", env)
    staged = path / "src" / "models"
    carried = yaml.safe_load((staged / "tiny-llama-mine.yaml").read_text())["lora_adapters"]["mine"]
    assert carried == "adapters/mine"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (staged / carried / name).read_bytes() == (adapter / name).read_bytes()

    entry["lora_adapters"]["hub"] = {"source": "acme/tiny-adapter", "revision": "abc123"}
    (catalog / "tiny-llama-mine.yaml").write_text(yaml.safe_dump(entry))
    code = "import service; print([(m.model_id, m.revision) for m in service.ShardBento.models])"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**env, "SHARDBENTO_MODEL": "tiny-llama-mine"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "('acme/tiny-adapter', 'abc123')" in done.stdout
