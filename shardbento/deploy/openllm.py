"""Export built Bentos as an OpenLLM model repository: a git folder laid out as a Bento store."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

logger = logging.getLogger(__name__)

# OpenLLM looks for <repo>/bentoml/bentos/<name>/<version>/bento.yaml and serves with BENTOML_HOME=<repo>/bentoml.
STORE_DIR = Path("bentoml") / "bentos"
ALIAS = "latest"  # a file beside the versions naming one of them: `openllm serve NAME:latest`


def _store_path(tag: str) -> Path:
    import bentoml

    return Path(bentoml.bentos.get(tag).path)


def export_repo(tags: list[str], repo: Path, commit: bool = True) -> Path:
    """Copy each Bento from the local store into `repo` and commit, ready for `openllm repo add`."""
    for tag in tags:
        source = _store_path(tag)
        target = repo / STORE_DIR / source.parent.name / source.name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target)
        (target.parent / ALIAS).write_text(source.name + "\n")
        logger.info("exported %s to %s", tag, target)
    if commit:
        _commit(repo, f"shardbento models: {', '.join(tags)}")
    return repo


def _commit(repo: Path, message: str) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)

    if not (repo / ".git").exists():
        git("init", "-q", "-b", "main")
    git("add", "-A")
    identity = ["-c", "user.name=shardbento", "-c", "user.email=shardbento@localhost"]
    git(*identity, "commit", "-q", "--allow-empty", "-m", message)
