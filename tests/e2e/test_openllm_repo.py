"""The OpenLLM CLI (own venv: it pins bentoml 1.4.8) lists and serves a Bento exported as a model repository.

Opt-in (`make openllm`): runs with SHARDBENTO_OPENLLM_TEST=1 and .venv-openllm built from env/openllm.txt.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from servers import Server, free_port, stop, wait_ready

REPO = Path(__file__).resolve().parents[2]
OPENLLM_BIN = REPO / ".venv-openllm" / "bin"
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, dict[str, str]]:
    if os.environ.get("SHARDBENTO_OPENLLM_TEST") != "1":
        pytest.skip("opt-in: run `make openllm` (SHARDBENTO_OPENLLM_TEST=1)")
    if not (OPENLLM_BIN / "openllm").exists():
        pytest.skip("no .venv-openllm: `make openllm` creates it from env/openllm.txt")
    home = tmp_path_factory.mktemp("bentoml-home")
    repo = tmp_path_factory.mktemp("openllm-repo")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    build = [sys.executable, "-m", "shardbento", "bento", MODEL]
    tag = subprocess.run(build, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.split()[
        -1
    ]
    subprocess.run(
        [sys.executable, "-m", "shardbento", "openllm", str(repo), tag], cwd=REPO, env=env, check=True
    )
    openllm_env = {
        **{k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "BENTOML_HOME")},
        # openllm runs `python -m uv` from PATH; a local wheel folder for pip serves uv too.
        "PATH": f"{OPENLLM_BIN}:{os.environ['PATH']}",
        "OPENLLM_HOME": str(tmp_path_factory.mktemp("openllm-home")),
        "OPENLLM_TEST_REPO": str(repo),  # openllm's own switch for a local repository instead of a git clone
        "BENTOML_DO_NOT_TRACK": "true",
    }
    if os.environ.get("PIP_FIND_LINKS") and not os.environ.get("UV_FIND_LINKS"):
        openllm_env["UV_FIND_LINKS"] = os.environ["PIP_FIND_LINKS"]
    return tag, repo, openllm_env


def test_openllm_lists_the_exported_bento(exported) -> None:
    tag, _, env = exported
    listing = subprocess.run(
        [str(OPENLLM_BIN / "openllm"), "model", "list"], env=env, capture_output=True, text=True, timeout=120
    )
    assert listing.returncode == 0, listing.stderr[-3000:]
    # openllm shows one entry per Bento: its version or, depending on how versions sort, our `latest` alias.
    name = tag.split(":")[0]
    assert tag in listing.stdout or f"{name}:latest" in listing.stdout, listing.stdout


def test_openllm_serves_the_exported_bento(exported, tmp_path: Path) -> None:
    tag, _, env = exported
    port = free_port()
    log_path = tmp_path / "openllm-serve.log"
    command = [str(OPENLLM_BIN / "openllm"), "serve", f"shardbento-{MODEL}:latest", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    try:
        wait_ready(server, timeout_s=600)  # the first serve installs the Bento's requirements into a venv
        body = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}
        answer = httpx.post(f"{server.url}/chat", json=body, timeout=120).json()
        assert answer["model"] == MODEL and answer["usage"]["completion_tokens"] >= 1
    finally:
        stop(process)
