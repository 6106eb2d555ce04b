"""Checks a local checkpoint's safetensors shards before loading, so a bad shard is named, not guessed."""

from __future__ import annotations

import json
import struct
from pathlib import Path

MAX_HEADER_BYTES = 100 * 1024 * 1024


class CorruptWeights(RuntimeError):
    """A weight shard is missing, truncated or unreadable; the message names the file."""


def check_checkpoint(directory: Path) -> int:
    """Every shard the index names exists, and every shard's header and size agree; the shard count."""
    index = directory / "model.safetensors.index.json"
    shards = sorted(directory.glob("*.safetensors"))
    if index.is_file():
        try:
            named = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptWeights(f"{index}: not a valid safetensors index: {exc}") from None
        missing = sorted(name for name in named if not (directory / name).is_file())
        if missing:
            raise CorruptWeights(f"{directory / missing[0]}: weight shard named by {index.name} is missing")
    for shard in shards:
        check_shard(shard)
    return len(shards)


def check_shard(path: Path) -> None:
    """The header parses and the tensors it lists end exactly at the end of the file."""
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise CorruptWeights(f"{path}: truncated weight shard ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CorruptWeights(
                f"{path}: corrupt weight shard (header of {header_len} bytes in a {size}-byte file)"
            )
        try:
            header = json.loads(file.read(header_len))
        except ValueError:
            raise CorruptWeights(f"{path}: corrupt weight shard (the header is not JSON)") from None
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if expected != size:
        raise CorruptWeights(
            f"{path}: truncated or corrupt weight shard: its header needs {expected} bytes, the file has {size}"
        )


def check_spec_weights(spec: object) -> None:
    """Check the local checkpoint a catalog spec loads from; hub ids are checked by the download."""
    from shardbento.plan.source import resolve_source

    path = Path(str(resolve_source(spec)))  # type: ignore[arg-type]
    if path.is_dir():
        check_checkpoint(path)
