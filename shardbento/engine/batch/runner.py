"""The model runner: forward passes over the batch's KV cache, driven by the scheduler with plain data."""

from __future__ import annotations

import logging
from typing import Any

import torch

from shardbento.engine.batch.crossattn import CrossAttentionSlots, cross_attention_shape
from shardbento.engine.batch.kvslots import SlotKVCache
from shardbento.engine.batch.lean import LeanDecode
from shardbento.engine.batch.packed import DecodeRows
from shardbento.engine.batch.prefill import PrefillChunk, PrefillPaths
from shardbento.engine.batch.selfcheck import decodes_lean, enable_packing, mixes_right
from shardbento.engine.hf.placement import device_ints, hidden_states_device, input_device
from shardbento.engine.lora.manager import AdapterCalls

logger = logging.getLogger(__name__)


class ModelRunner(PrefillPaths, AdapterCalls):
    """Owns the model's KV state; every method takes and returns plain data (picklable arguments).

    The scheduler decides, the runner computes: a tensor-parallel follower rank can replay the same
    calls on its shard and stay in step. Fresh prompts are prefilled together in one left-padded
    forward (a batched prefill costs far less per prompt than one forward each on CPU); the rest of a
    chunked prompt runs alone on the request's own transformers cache until its prompt is complete.
    """

    def __init__(
        self,
        model: Any,
        num_slots: int,
        max_model_len: int,
        pool_tokens: int | None = None,
        max_images: int = 1,
    ) -> None:
        self.model = model
        self._cross_shape = cross_attention_shape(model, max_images)  # Mllama's image keys, per row
        self.kv = SlotKVCache(
            num_slots,
            max_model_len,
            pool_tokens or num_slots * max_model_len,
            self._cross(num_slots, num_slots),
        )
        self.pool_source = "max_num_seqs x max_model_len"
        self._device = input_device(model)  # input ids, positions and masks go here
        self._hidden_device = hidden_states_device(model)  # logits_to_keep's indices go here
        self._partial: tuple[int, int] | None = None  # (seq id, row) of a prompt prefilled in chunks
        self._laid_out = 0  # the longest row this step's layout holds (its completing prompts included)
        self.num_rows = 0  # slots 0..num_rows-1 hold running sequences
        # Fresh prompts prefilled together go packed in one row (packed.py) once allocate_pool() has
        # checked the model packs right; each then computes only its tokens past its cached prefix.
        self.packs = False
        self.mixes = False  # and the running rows' decode tokens go in that same forward (mixed steps)
        self.keeps_scores = True  # prompt logprobs (scoring.py); a follower rank sets it False
        self.lean: LeanDecode | None = None  # decode steps without the modeling code's wrappers (lean.py)
        self._scores = {}
        self._score_tails = {}

    def _cross(self, num_slots: int, image_rows: int) -> CrossAttentionSlots | None:
        if self._cross_shape is None:
            return None
        return CrossAttentionSlots(self._cross_shape, num_slots, image_rows)

    def can_mix(self) -> bool:
        """Whether this step's prompts may share the running rows' forward (runner.mixes): not while a
        running row attends to an image through cross-attention (a mixed forward has no cross keys)."""
        cross = self.kv.cross
        return self.mixes and (cross is None or all(s is None for s in cross.slot_of_row[: self.num_rows]))

    def image_rows_free(self) -> int | None:
        """Image sequences that may still join (the cross-attention state's free slots); None: no limit."""
        return None if self.kv.cross is None else self.kv.cross.free_image_rows

    def prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        """Logits of each chunk's last token, one row per chunk, in order. The pool is first laid out
        for the rows and lengths after this step (the scheduler checked that they fit). Text chunks go
        packed in one forward (runner.packs), else complete prompts left-padded together and a chunk of
        a long prompt alone in its row; vision prompts alone with their pixels."""
        self._lay_out([c for c in chunks if c.slot is not None])
        text = [i for i, c in enumerate(chunks) if c.inputs is None]
        rows: dict[int, torch.Tensor] = {}
        if text and self.packs and (len(text) > 1 or chunks[text[0]].in_row):
            rows.update(zip(text, self._prefill_packed([chunks[i] for i in text]), strict=True))
        elif text:
            fresh = [i for i in text if not chunks[i].in_row]
            if fresh:
                rows.update(zip(fresh, self._prefill_fresh([chunks[i] for i in fresh]), strict=True))
            rows.update((i, self._prefill_row_alone(chunks[i])) for i in text if chunks[i].in_row)
        for i, chunk in enumerate(chunks):
            if chunk.inputs is not None:
                rows[i] = self._prefill_pixels(chunk)
        return torch.stack([rows[i] for i in range(len(chunks))])

    def _lay_out(self, completing: list[PrefillChunk]) -> None:
        """Fit the pool to the rows and lengths after this step (the scheduler checked that they fit)."""
        self._laid_out = 0
        if completing:
            rows = max(self.num_rows, *(c.slot + 1 + len(c.copies) for c in completing))
            longest = max(
                [length + 1 for length in self.kv.lengths[: self.num_rows]]
                + [c.start + len(c.token_ids) + 1 for c in completing]
            )
            self.kv.fit(rows, longest)
            self._laid_out = longest
        self.num_rows = max([self.num_rows, *(c.slot + 1 + len(c.copies) for c in completing)])

    def mixed(
        self, chunks: list[PrefillChunk], token_ids: list[int], lora_slots: list[int] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward for a decode token of each of slots 0..n-1 (n = len(token_ids)) and the step's
        prompt chunks packed after them (completing prompts take slots from n on; a chunk of a long
        prompt grows in its row), as vLLM's mixed batches: a step's prompts cost no decode forward of
        their own. Logits of the chunks [chunks, vocab] and of the decode tokens [n, vocab]; `lora_slots`:
        the decode rows' adapter slots (none: the base model)."""
        self._lay_out([c for c in chunks if c.slot is not None])
        for chunk in chunks:
            if chunk.in_row:
                self._row_chunk(chunk)  # its row laid out before the decode rows are readied
        n = len(token_ids)
        decode = DecodeRows(self.kv, n, self._begin_decode(n))
        logits = self._prefill_packed(chunks, decode, token_ids, lora_slots)
        return logits[n:], logits[:n]

    def decode(self, token_ids: list[int], lora_slots: list[int] = ()) -> torch.Tensor:
        """One token for each of slots 0..n-1 (n = len(token_ids)), each row under its adapter slot in
        `lora_slots` (none: the base model); logits [n, vocab]."""
        num_rows = len(token_ids)
        ids, positions = device_ints([token_ids, self.kv.positions(num_rows)], self._device)
        mask = self._begin_decode(num_rows)
        with self.adapters_of(list(lora_slots)):
            if self.lean is not None:
                logits = self.lean(ids[:, None], positions[:, None], mask[:, None, None, :], self.kv)
            else:
                logits = self.model(
                    input_ids=ids[:, None],
                    position_ids=positions[:, None],
                    attention_mask=self._attention_mask(mask)[:, None, None, :],
                    past_key_values=self.kv,
                    use_cache=True,
                    logits_to_keep=1,
                    **self._cross_inputs(num_rows),
                ).logits[:, -1]
        self.kv.advance(num_rows)
        return logits

    def _cross_inputs(self, num_rows: int) -> dict[str, torch.Tensor]:
        """The decode rows' image mask rows, when some row attends to an image (Mllama); else nothing
        (the model then skips its cross-attention layers)."""
        if self.kv.cross is None:
            return {}
        mask = self.kv.cross.begin_step(num_rows, self._device)
        return {} if mask is None else {"cross_attention_mask": mask}

    def _begin_decode(self, num_rows: int) -> torch.Tensor:
        """Ready the KV pool for one new token in each of rows 0..num_rows-1: the rows' keys mask
        [rows, kv_len] (each row sees its own tokens and the new one)."""
        kv_len = max(self.kv.lengths[:num_rows]) + 1
        starts = self.kv.begin_step(num_rows, kv_len, self._device)
        return torch.arange(kv_len, device=self._device)[None, :] <= starts[:, None]

    def allocate_pool(self, limits: Any) -> int:
        """Size the KV pool by the one rule (plan.memory.kv_pool_tokens) after a warm-up forward of a
        full prefill chunk, and allocate it now, at load; tensor-parallel ranks (every rank calls this,
        in step) agree on the smallest. Returns the pool's tokens."""
        from shardbento.plan.kvpool import kv_pool

        per_token = self._kv_bytes_per_token(min(limits.step_tokens(), self.kv.max_len))
        image = self._cross_shape.bytes_per_sequence() if self._cross_shape is not None else {}
        free = None
        if any(device.startswith("cuda") for device in per_token):
            devices = set(per_token) | set(image)
            free = {d: _usable_cuda_bytes(d, limits.gpu_memory_utilization) for d in devices}
        pool = kv_pool(
            limits,
            per_token,
            max_num_seqs=self.kv.num_slots,
            max_model_len=self.kv.max_len,
            free_bytes=free,
            bytes_per_image_seq=image,
        )
        tokens, source = _smallest_of_ranks(pool.tokens, self._device), pool.source
        image_rows = _smallest_of_ranks(pool.image_rows, self._device)
        if tokens < min(16, self.kv.max_len):
            raise RuntimeError(
                f"no memory left for the KV cache: a pool of {tokens} tokens ({source}); "
                "lower max_model_len, use more or larger GPUs, or set limits.kv_cache_tokens"
            )
        self.kv = SlotKVCache(
            self.kv.num_slots, self.kv.max_len, tokens, self._cross(self.kv.num_slots, image_rows)
        )
        if self.kv.cross is not None:
            self.kv.cross.allocate()
            source += f"; cross-attention keys for {image_rows} image sequences at once"
        self.pool_source = source
        self.prefill([PrefillChunk(-1, (0,), 0, 0)])  # every layer's pool is allocated by this forward
        self.release([0])
        self.packs = _smallest_of_ranks(int(enable_packing(self.model)), self._device) == 1
        self.mixes = self.packs and _smallest_of_ranks(int(mixes_right(self)), self._device) == 1
        if _smallest_of_ranks(int(decodes_lean(self)), self._device) != 1:
            self.lean = None
        return tokens

    def batches_images(self) -> bool:
        """The load-time check of the image paths on this model (visioncheck.py), agreed by every rank."""
        from shardbento.engine.batch.visioncheck import batches_vision_right

        return _smallest_of_ranks(int(batches_vision_right(self)), self._device) == 1

    def _kv_bytes_per_token(self, num_tokens: int) -> dict[str, int]:
        """KV bytes one token takes on each device, read off a scratch forward's cache."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        ids = torch.zeros((1, num_tokens), dtype=torch.long, device=self._device)
        self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        per_token: dict[str, int] = {}
        for layer in cache.layers:
            keys = getattr(layer, "keys", None)
            if keys is None or keys.numel() == 0:
                continue
            device = str(keys.device)
            per_token[device] = (
                per_token.get(device, 0) + keys.shape[1] * keys.shape[3] * keys.element_size() * 2
            )
        return per_token

    def release(self, rows: list[int]) -> None:
        """Free rows of the batch; the last row fills each gap (the scheduler mirrors this order). A
        prompt being prefilled in chunks keeps the row right after the running ones."""
        for row, last in release_moves(rows, self.num_rows):
            if row != last:
                self.kv.move(last, row)
            else:
                self.kv.free(row)
        self.num_rows -= len(rows)
        if self._partial is not None and self._partial[1] != self.num_rows:
            self.kv.move(self._partial[1], self.num_rows)
            self._partial = (self._partial[0], self.num_rows)
            self.kv.partial_row = self.num_rows

    def clear_rows(self) -> None:
        """Forget every row and any partly prefilled prompt's row, after a failed step (the scheduler
        failed what it was computing): rows that step laid out or began are not left behind for the next
        steps to build on. Cached prefix blocks stay."""
        for slot in range(self.kv.num_slots):
            self.kv.free(slot)
        self.num_rows = 0
        self._partial = self.kv.partial_row = None

    def store_prefix(self, blocks: list[tuple[int, int, int]]) -> None:
        """Cache full blocks of rows' KV (the scheduler's PrefixIndex chose which, and where)."""
        self.kv.store_prefix(blocks)

    def drop_prefix(self, moves: list[tuple[int, int]], count: int) -> None:
        self.kv.drop_prefix(moves, count)

    def drop(self, seq_id: int) -> None:
        """Forget a sequence whose prompt was only partly prefilled (its row is freed, its scores so far
        go)."""
        self.take_scores(seq_id)
        if self._partial is not None and self._partial[0] == seq_id:
            self.kv.free(self._partial[1])
            self._partial = self.kv.partial_row = None


def release_moves(rows: list[int], num_rows: int) -> list[tuple[int, int]]:
    """(row, last) pairs that remove `rows` from a batch of `num_rows`, filling gaps from the end."""
    moves = []
    for row in sorted(rows, reverse=True):
        num_rows -= 1
        moves.append((row, num_rows))
    return moves


def _usable_cuda_bytes(device: str, utilization: float) -> int:
    """What the KV pool may take on a GPU: its share of the memory less what is in use now (weights and
    the warm-up's activations, which torch's allocator keeps reserved)."""
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return int(total * utilization) - (total - free)


def _smallest_of_ranks(tokens: int, device: torch.device) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return tokens
    value = torch.tensor([tokens], dtype=torch.long, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())
