"""The on-disk cache (generated tiny models, native conversions of THUDM checkpoints): built once, atomically."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """The cache directory: $SHARDBENTO_CACHE, else ~/.cache/shardbento (read at call time)."""
    configured = os.environ.get("SHARDBENTO_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "shardbento"


def build_once(final_dir: Path, build: Callable[[Path], None], what: str) -> Path:
    """`final_dir`, built by `build(tmp_dir)` on first use; concurrent callers wait on a lock file and
    every reader sees either nothing or the whole directory."""
    if final_dir.is_dir():
        return final_dir
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(final_dir.parent / f".{final_dir.name}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if not final_dir.is_dir():
            _build_atomically(final_dir, build, what)
    return final_dir


def _build_atomically(final_dir: Path, build: Callable[[Path], None], what: str) -> None:
    """Build into a temporary sibling directory, then rename it into place; a lost race keeps the winner."""
    started_s = time.monotonic()
    logger.info("Building %s into %s", what, final_dir)
    build_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    try:
        build(build_dir)
        os.rename(build_dir, final_dir)
    except OSError as error:
        shutil.rmtree(build_dir, ignore_errors=True)
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not final_dir.is_dir():
            raise
        logger.info("Another process built %s first; using it", final_dir)
        return
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    logger.info("Built %s in %.1f s", what, time.monotonic() - started_s)
