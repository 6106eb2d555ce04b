"""The runner's prefill paths: prompts packed in one row (with a mixed step's decode tokens and a chunk
growing in its pool row), left-padded together, a chunk alone in its row, a vision prompt with pixels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from shardbento.engine.batch.images import image_mask_row, rope_positions
from shardbento.engine.batch.kvslots import SlotKVCache
from shardbento.engine.batch.packed import DecodeRows, PackedRows, RowChunk, packed_rows
from shardbento.engine.batch.scoring import Score, score_chunk
from shardbento.engine.hf.placement import device_ints


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """Prompt tokens of one request for one step.

    `start` is the position of the first token (0 for a fresh prompt, more for the next chunk of a
    long one); `slot` is the batch slot the request takes once this chunk completes its prompt, or
    None while more chunks follow; `copies` are more slots that take the same KV (twins: the n choices
    of one prompt, computed once); `prefix` names cached KV blocks the chunk continues from. A prompt
    prefilled over several steps (`length`, its whole size, is set) grows in its own row of the KV
    pool, the row after the running ones. `inputs` holds a vision prompt's processor outputs (pixel
    values and the like): such a prompt is prefilled whole, alone, and decodes in the batch like text.
    """

    seq_id: int
    token_ids: tuple[int, ...]
    start: int
    slot: int | None
    inputs: dict[str, Any] | None = None
    copies: tuple[int, ...] = ()
    prefix: tuple[int, ...] = ()  # cached blocks that hold tokens 0..start-1 (prefix caching)
    length: int = 0  # a chunk of a prompt prefilled in its pool row: the whole prompt's tokens
    scored: int | None = None  # prompt logprobs asked (with this many alternatives): logits at every token
    lora_slot: int = -1  # the device slot of the request's LoRA adapter (-1: the base model)

    @property
    def in_row(self) -> bool:
        return self.length > 0


class PrefillPaths:
    """The ModelRunner's ways to compute prompts (it provides model, kv, num_rows and the devices)."""

    model: Any
    kv: SlotKVCache
    num_rows: int
    _device: torch.device
    _hidden_device: torch.device
    _partial: tuple[int, int] | None
    adapters_of: Any  # AdapterCalls: the context a forward's tokens' adapter slots are set in

    keeps_scores: bool  # False on a tensor-parallel follower: rank 0 delivers prompt logprobs
    _scores: dict[int, list[Score] | Exception]  # seq id -> its prompt's scores so far, or their failure
    _score_tails: dict[int, torch.Tensor]  # seq id -> the logits row after its last chunk

    def _keep_scores(self, chunk: PrefillChunk, logits: torch.Tensor) -> None:
        """A scored chunk's prompt logprobs from its logits (a row per token), kept until the scheduler
        takes them as its prompt completes; the last row waits for the prompt's next chunk."""
        if chunk.scored is None or not self.keeps_scores:
            return
        previous = self._score_tails.pop(chunk.seq_id, None)
        if chunk.start == 0:  # a prompt's first chunk (again, after a failed or abandoned step)
            previous = None
            self._scores.pop(chunk.seq_id, None)
        so_far = self._scores.setdefault(chunk.seq_id, [])
        if isinstance(so_far, Exception):
            return
        try:
            so_far.extend(score_chunk(logits, chunk.token_ids, previous, chunk.scored))
        except Exception as exc:  # noqa: BLE001 - that request fails; the ranks stay in step
            self._scores[chunk.seq_id] = exc
            return
        if chunk.slot is None:
            self._score_tails[chunk.seq_id] = logits[-1].clone()

    def take_scores(self, seq_id: int) -> list[Score] | Exception:
        """The prompt logprobs computed for a sequence (empty when none; the exception when computing
        them failed), forgotten here."""
        self._score_tails.pop(seq_id, None)
        return self._scores.pop(seq_id, [])

    def _prefill_packed(
        self,
        chunks: list[PrefillChunk],
        decode: DecodeRows | None = None,
        token_ids: list[int] = (),
        lora_slots: list[int] = (),
    ) -> torch.Tensor:
        """Prompts as one packed row: each chunk's tokens after the other, each attending to its own
        cached prefix (gathered in front, in chunk order) and its own earlier tokens; a chunk of a prompt
        growing in its pool row (at most one) goes last and attends to that row. With `decode`, the
        running rows' `token_ids` go first (a mixed step). Logits: decode rows', then the chunks' in the
        order given."""
        from transformers import DynamicCache

        order = [i for i, c in enumerate(chunks) if not c.in_row] + [
            i for i, c in enumerate(chunks) if c.in_row
        ]
        plain = [chunks[i] for i in order if not chunks[i].in_row]
        in_row = [chunks[i] for i in order if chunks[i].in_row]
        row = self._row_chunk(in_row[0]) if in_row else None
        rows = PackedRows.of([c.start for c in plain], [len(c.token_ids) for c in plain], decode, row)
        cache = DynamicCache(config=self.model.config)
        if rows.cached_tokens:
            for layer_idx in self.kv.layer_indices():
                parts = [self.kv.prefix(layer_idx, list(c.prefix)) for c in plain if c.start]
                starts = [c.start for c in plain if c.start]
                keys = torch.cat([k[:, :, :n] for (k, _), n in zip(parts, starts, strict=True)], dim=2)
                values = torch.cat([v[:, :, :n] for (_, v), n in zip(parts, starts, strict=True)], dim=2)
                cache.update(keys, values, layer_idx)
        ids = [
            *token_ids,
            *(t for c in plain for t in c.token_ids),
            *(t for c in in_row for t in c.token_ids),
        ]
        positions = rows.positions(self.kv.positions(len(token_ids))).tolist()
        step = device_ints([ids, positions], self._device)  # one copy to the device
        last = rows.last_tokens()
        scored = [
            (c, rows.lead + at) for c, (at, _) in zip(plain, rows.new, strict=True) if c.scored is not None
        ]
        scored += [(c, rows.lead + rows.new_tokens) for c in in_row if c.scored is not None]
        keep = (
            torch.cat([last, *(torch.arange(at, at + len(c.token_ids)) for c, at in scored)])
            if scored
            else last
        )
        slots = []
        if self.lora is not None:  # each token's adapter slot, the decode rows' first
            slots = [*(lora_slots or [-1] * len(token_ids))]
            slots += [c.lora_slot for c in [*plain, *in_row] for _ in c.token_ids]
        with packed_rows(rows), self.adapters_of(slots):
            out = self.model(
                input_ids=step[0][None],
                position_ids=step[1][None],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=keep.to(self._hidden_device),
            )
        self.kv.advance(len(token_ids))  # the decode rows' new tokens are in their rows
        if in_row:  # its length first: a load below may lay the pool out again, keeping known lengths
            self._row_done(in_row[0])
        for n, chunk in enumerate(plain):
            self.kv.load(chunk.slot, cache, spans=rows.spans(n))
            self._copy(chunk)
        logits = out.logits[0]
        at = len(last)
        for chunk, _ in scored:  # every position of these chunks, after the last tokens'
            self._keep_scores(chunk, logits[at : at + len(chunk.token_ids)])
            at += len(chunk.token_ids)
        logits = logits[: len(last)]
        lead = len(token_ids)
        chunk_logits = logits[lead:][torch.tensor(order).argsort()]  # back to the order given
        return torch.cat([logits[:lead], chunk_logits])

    def _row_chunk(self, chunk: PrefillChunk) -> RowChunk:
        """The chunk's row, laid out for the whole prompt at its first chunk (with a cached prefix copied
        in front); the row after the running ones, which the prompt keeps until it joins."""
        if self._partial is None or self._partial[0] != chunk.seq_id:
            if self._partial is not None:  # another prompt's chunks were abandoned (the scheduler reset it)
                self.drop(self._partial[0])
            row = self.num_rows if chunk.slot is None else chunk.slot
            self._partial, self.kv.partial_row = (chunk.seq_id, row), row
            # the completing prompts' rows are not loaded yet: their lengths come from the step's layout
            lengths = [n + 1 for n in self.kv.lengths[: self.num_rows]]
            longest = max([*lengths, chunk.length + 1, self._laid_out])
            self.kv.fit(self.num_rows, longest)
            if chunk.prefix:
                self.kv.load_prefix(row, list(chunk.prefix), chunk.start)
        return RowChunk(self.kv, self._partial[1], chunk.start, len(chunk.token_ids))

    def _row_done(self, chunk: PrefillChunk) -> None:
        """After a row chunk's forward: its row holds the prompt so far; the last chunk joins the batch."""
        self.kv.lengths[self._partial[1]] = chunk.start + len(chunk.token_ids)
        if chunk.slot is not None:
            self._partial = self.kv.partial_row = None
            self._copy(chunk)

    def _prefill_row_alone(self, chunk: PrefillChunk) -> torch.Tensor:
        """A row chunk in a forward of its own (the model is not packed): the pool row is the cache."""
        row = self._row_chunk(chunk).row
        end = chunk.start + len(chunk.token_ids)
        keep = (
            torch.arange(end, device=self._device)[None, :]
            <= torch.arange(chunk.start, end, device=self._device)[:, None]
        )
        self.kv.begin_chunk(row, chunk.start, len(chunk.token_ids))
        try:
            with self.adapters_of([chunk.lora_slot] * len(chunk.token_ids)):
                out = self.model(
                    input_ids=torch.tensor([chunk.token_ids], dtype=torch.long, device=self._device),
                    position_ids=torch.arange(chunk.start, end, device=self._device)[None],
                    attention_mask=self._attention_mask(keep)[None, None],
                    past_key_values=self.kv,
                    use_cache=True,
                    logits_to_keep=1 if chunk.scored is None else 0,
                )
        finally:
            self.kv.end_chunk()
        self._row_done(chunk)
        self._keep_scores(chunk, out.logits[0])
        return out.logits[0, -1]

    def _prefill_fresh(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        """Complete prompts in one left-padded forward; a chunk with a cached prefix continues from it
        (its first `start` tokens come from the prefix cache, left-padded to the longest such prefix)."""
        from transformers import DynamicCache

        width = max(len(c.token_ids) for c in chunks)
        cached = max(c.start for c in chunks)
        pads = torch.tensor([width - len(c.token_ids) for c in chunks])
        starts = torch.tensor([c.start for c in chunks])
        ids = torch.tensor([[0] * int(p) + list(c.token_ids) for p, c in zip(pads, chunks, strict=True)])
        steps = torch.arange(width)[None, :] - pads[:, None]  # negative: left padding
        mask = steps >= 0
        cache = DynamicCache(config=self.model.config)
        if cached:
            for layer_idx in self.kv.layer_indices():
                cache.update(*self._cached_prefixes(layer_idx, chunks, cached), layer_idx)
            mask = torch.cat([torch.arange(cached)[None, :] >= (cached - starts)[:, None], mask], dim=1)
        slots = [c.lora_slot for c in chunks for _ in range(width)] if self.lora is not None else []
        with self.adapters_of(slots):
            out = self.model(
                input_ids=ids.to(self._device),
                attention_mask=mask.long().to(self._device),
                position_ids=(steps + starts[:, None]).clamp(min=0).to(self._device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=0 if any(c.scored is not None for c in chunks) else 1,
            )
        for row, chunk in enumerate(chunks):
            self.kv.load(chunk.slot, cache, row=row, offset=cached - chunk.start + int(pads[row]))
            self._copy(chunk)
            self._keep_scores(chunk, out.logits[row, int(pads[row]) :])
        return out.logits[:, -1]

    def _cached_prefixes(
        self, layer_idx: int, chunks: list[PrefillChunk], width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each chunk's first `start` tokens of KV from the prefix cache, right-aligned in `width`."""
        rows: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for row, chunk in enumerate(chunks):
            if chunk.start:
                keys, values = self.kv.prefix(layer_idx, list(chunk.prefix))
                rows.append((row, keys[0, :, : chunk.start], values[0, :, : chunk.start]))
        like = rows[0][1]
        shape = (len(chunks), like.shape[0], width, like.shape[2])
        keys, values = (like.new_zeros(shape) for _ in range(2))
        for row, k, v in rows:
            keys[row, :, width - k.shape[1] :] = k
            values[row, :, width - v.shape[1] :] = v
        return keys, values

    def _prefill_pixels(self, chunk: PrefillChunk) -> torch.Tensor:
        """A vision prompt whole, its pixel values in the same forward, then into its slot with the
        model's own position offset (GLM-4V's image positions, Qwen2-VL's rope delta) and, for a
        cross-attention model, its image keys and last mask row."""
        from transformers import DynamicCache

        inputs = {
            k: v.to(self._device) if isinstance(v, torch.Tensor) else v for k, v in chunk.inputs.items()
        }
        positions, offset = rope_positions(self.model, inputs)
        cache = DynamicCache(config=self.model.config)
        with self.adapters_of([chunk.lora_slot]):  # one request: its adapter in every layer, tower too
            out = self.model(**inputs, **positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
        if offset is None:
            offset = int(getattr(out, "position_delta", None) or 0)
        self.kv.load(chunk.slot, cache, position_offset=offset, image_mask=image_mask_row(chunk.inputs))
        self._copy(chunk)
        return out.logits[0, -1]

    def _copy(self, chunk: PrefillChunk) -> None:
        for slot in chunk.copies:
            self.kv.copy(chunk.slot, slot)

    def _attention_mask(self, keep: torch.Tensor) -> torch.Tensor:
        if getattr(self.model.config, "_attn_implementation", "sdpa") != "eager":
            return keep
        dtype = self.model.dtype
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(
            ~keep, torch.finfo(dtype).min
        )
