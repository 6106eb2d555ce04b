"""The KV memory's one sizing rule, at load (the engine) and offline (the planner): the self-attention
pool in tokens and, for cross-attention models, how many image sequences the cross-attention state holds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shardbento.plan.memory import GIB

# The cross-attention state (Mllama's image keys per running image sequence) may take at most this share
# of the KV memory; past it, fewer image sequences run at once than the batch has slots.
CROSS_ATTENTION_SHARE = 0.5


@dataclass(frozen=True, slots=True)
class KVPool:
    """The KV memory's split: the self-attention pool in tokens (and the rule that sized it), and the
    image sequences the cross-attention state holds (0 for models without cross-attention)."""

    tokens: int
    source: str
    image_rows: int = 0


def kv_pool(
    limits: Any,
    bytes_per_token: dict[Any, int],
    *,
    max_num_seqs: int,
    max_model_len: int,
    free_bytes: dict[Any, int] | None = None,
    bytes_per_image_seq: dict[Any, int] | None = None,
) -> KVPool:
    """kv_pool_tokens() beside the cross-attention state: `bytes_per_image_seq` (one image sequence's
    cross-attention keys on each device) takes a state for every slot when that is at most
    CROSS_ATTENTION_SHARE of the KV memory, else for as many sequences as that share holds (at least
    one); the pool gets the rest. With limits.kv_cache_tokens the pool is that and every slot gets a
    state beside it."""
    image = {d: b for d, b in (bytes_per_image_seq or {}).items() if b}
    if not image:
        return KVPool(
            *kv_pool_tokens(
                limits,
                bytes_per_token,
                max_num_seqs=max_num_seqs,
                max_model_len=max_model_len,
                free_bytes=free_bytes,
            )
        )
    if limits.kv_cache_tokens is not None:
        rows = max_num_seqs
    elif free_bytes is not None:
        rows = min(int(max(free_bytes.get(d, 0), 0) * CROSS_ATTENTION_SHARE) // b for d, b in image.items())
        free_bytes = {d: f - min(max_num_seqs, max(rows, 1)) * image.get(d, 0) for d, f in free_bytes.items()}
    else:
        rows = int(limits.kv_cache_gib * GIB * CROSS_ATTENTION_SHARE) // sum(image.values())
    rows = min(max_num_seqs, max(rows, 1))
    cpu_bytes = (
        None if free_bytes is not None else int(limits.kv_cache_gib * GIB) - rows * sum(image.values())
    )
    tokens, source = kv_pool_tokens(
        limits,
        bytes_per_token,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        free_bytes=free_bytes,
        cpu_bytes=cpu_bytes,
    )
    return KVPool(tokens, source, rows)


def kv_pool_tokens(
    limits: Any,
    bytes_per_token: dict[Any, int],
    *,
    max_num_seqs: int,
    max_model_len: int,
    free_bytes: dict[Any, int] | None = None,
    cpu_bytes: int | None = None,
) -> tuple[int, str]:
    """The KV pool in tokens and where the number comes from: the one rule the engine allocates by and
    the planner prints.

    `bytes_per_token` is the KV one token takes on each device (a layer split: each GPU's layers; tensor
    parallel: one rank's share). `limits.kv_cache_tokens` wins; else, on GPUs, `free_bytes` (what each
    device has left after the weights and a warm-up forward, within gpu_memory_utilization) divided by
    that device's bytes per token, the smallest; else (CPU) `limits.kv_cache_gib` over all layers' bytes.
    Never more than max_num_seqs sequences of max_model_len could use.
    """
    if limits.kv_cache_tokens is not None:
        tokens, source = limits.kv_cache_tokens, "limits.kv_cache_tokens"
    elif free_bytes is not None:
        tokens = min(max(free_bytes[d], 0) // max(b, 1) for d, b in bytes_per_token.items())
        source = f"GPU memory left x gpu_memory_utilization {limits.gpu_memory_utilization:g}"
    else:
        budget = int(limits.kv_cache_gib * GIB) if cpu_bytes is None else cpu_bytes
        tokens = max(budget, 0) // max(sum(bytes_per_token.values()), 1)
        source = f"limits.kv_cache_gib {limits.kv_cache_gib:g}"
    return min(tokens, max_num_seqs * max_model_len), source
