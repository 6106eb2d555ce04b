"""The safetensors shard check: a good checkpoint passes; a truncated or missing shard is named."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from shardbento.plan.weights import CorruptWeights, check_checkpoint


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    from shardbento.tiny.models import ensure_generated

    return Path(shutil.copytree(ensure_generated("tiny-llama"), tmp_path / "model"))


def test_weights_good_checkpoint_passes(checkpoint: Path) -> None:
    assert check_checkpoint(checkpoint) == len(list(checkpoint.glob("*.safetensors")))


@pytest.mark.parametrize("keep_bytes", [0, 4, 100, -1])
def test_weights_truncated_shard_is_named(checkpoint: Path, keep_bytes: int) -> None:
    shard = sorted(checkpoint.glob("*.safetensors"))[-1]
    os.truncate(shard, keep_bytes if keep_bytes >= 0 else shard.stat().st_size - 1)
    with pytest.raises(CorruptWeights, match=str(shard)):
        check_checkpoint(checkpoint)


def test_weights_missing_shard_is_named(checkpoint: Path) -> None:
    shard = sorted(checkpoint.glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CorruptWeights, match=shard.name):
        check_checkpoint(checkpoint)
