"""A THUDM-format checkpoint as transformers' own GLM on disk: config, tokenizer and weights, converted
once into the cache, one safetensors shard at a time (a shard's tensors are the most held in memory)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from shardbento.cachedir import build_once, cache_root
from shardbento.thudm.layout import CheckpointError, glm_config, native_names, qkv_sizes
from shardbento.thudm.tokenizer import build_fast_tokenizer, detect_format

logger = logging.getLogger(__name__)

# Bump when the conversion's output changes (it is part of the directory name).
FORMAT_VERSION = 1
# Bumped apart per tokenizer format, so a fix to one format's conversion does not re-convert the other's
# weights. sentencepiece 2: BPE over the whole text (whitespace-run pieces), SentencePiece's decoding.
TOKENIZER_VERSIONS = {"sentencepiece": 2}
_FILES = ["*.json", "*.safetensors", "tokenizer.model"]


def local_checkpoint(source: str, revision: str | None) -> Path:
    """A local directory for `source`: itself, or the hub snapshot (config, safetensors, tokenizer.model)."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, revision=revision, allow_patterns=_FILES))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise CheckpointError(
            f"cannot fetch {source}@{revision} ({', '.join(_FILES)}) for the native GLM conversion: {exc}; "
            "check the network or HF_HUB_OFFLINE and, for a gated repository, HF_TOKEN, or point source at "
            "a local copy"
        ) from exc


def native_tokenizer(source: Path) -> Path:
    """The converted fast tokenizer with the native config (what vLLM gets beside the original weights)."""
    final_dir = cache_root() / "native" / f"{_key(source)}-tokenizer"
    return build_once(
        final_dir, lambda out: _write_front(source, out, _read_config(source)), f"tokenizer of {source}"
    )


def native_checkpoint(source: Path) -> Path:
    """The whole checkpoint as GlmForCausalLM loads it: config.json, generation_config.json, the tokenizer
    and the weights renamed (query_key_value split into q, k and v)."""
    return build_once(cache_root() / "native" / _key(source), lambda out: _convert(source, out), str(source))


def _read_config(source: Path) -> dict:
    path = source / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{source} has no config.json")
    return json.loads(path.read_text())


def _key(source: Path) -> str:
    """Directory name: the checkpoint's name and a hash of the conversion's versions, its config and shard
    names and sizes."""
    hasher = hashlib.sha256(f"format={FORMAT_VERSION}".encode())
    tokenizer_format = detect_format(source)
    if tokenizer_format in TOKENIZER_VERSIONS:
        hasher.update(f"{tokenizer_format}={TOKENIZER_VERSIONS[tokenizer_format]}".encode())
    hasher.update((source / "config.json").read_bytes())
    for shard in sorted(source.glob("*.safetensors")):
        hasher.update(f"{shard.name}:{shard.stat().st_size}".encode())
    return f"{source.resolve().name}-{hasher.hexdigest()[:10]}"


def _write_front(source: Path, out: Path, config: dict) -> None:
    """config.json and generation_config.json in transformers' GLM terms, and the fast tokenizer."""
    native = glm_config(config)
    (out / "config.json").write_text(json.dumps(native, indent=2))
    generation = {"eos_token_id": native["eos_token_id"], "pad_token_id": native["pad_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    build_fast_tokenizer(source, out, native["max_position_embeddings"])


def _convert(source: Path, out: Path) -> None:
    config = _read_config(source)
    _write_front(source, out, config)
    shards = sorted(source.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(
            f"{source} has no .safetensors weights (only PyTorch .bin files?); the native GLM loader reads "
            "safetensors: use a revision of the repository that has them"
        )
    weight_map: dict[str, str] = {}
    for shard in shards:
        weight_map.update(
            dict.fromkeys(_convert_shard(shard, out / shard.name, qkv_sizes(config)), shard.name)
        )
        logger.info("converted %s", shard.name)
    index = {"metadata": {"converted_from": str(source)}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _convert_shard(shard: Path, target: Path, sizes: tuple[int, int, int]) -> list[str]:
    """One shard: tensors renamed, the fused qkv split; returns the native names it wrote."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    with safe_open(shard, framework="pt") as reader:
        for name in reader.keys():  # noqa: SIM118 - safe_open is not a mapping
            names = native_names(name)
            if not names:
                continue
            tensor = reader.get_tensor(name)
            if len(names) == 1:
                tensors[names[0]] = tensor
                continue
            if tensor.shape[0] != sum(sizes):
                raise CheckpointError(
                    f"{name}: {tensor.shape[0]} rows, but the config's heads give q+k+v = {sum(sizes)}"
                )
            for native_name, part in zip(names, torch.split(tensor, sizes), strict=True):
                tensors[native_name] = part.contiguous()
    save_file(tensors, str(target), metadata={"format": "pt"})
    return list(tensors)
