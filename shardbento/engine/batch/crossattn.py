"""The batch's cross-attention state (Mllama): per image sequence, each cross-attention layer's image keys
and values (on that layer's device) and its row of the image mask; a text row reads zeros there.

Mllama's decoder reads a cross-attention layer's keys from `past_key_values.layers[idx]` and skips the
layer when nothing is cached there: a step with no image row skips every cross-attention layer, as a
text prompt's own generate() does. In a step with image rows, a text row's mask row is all zeros: the
model then turns its cross-attention into a uniform average over its keys, which are zeros (a free slot
is always zeroed), and masks the layer's MLP out for it, so the layer leaves a text row's hidden states
exactly as they were.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(slots=True)
class CrossLayerView:
    """What Mllama's cross-attention layer reads as `past_key_values.layers[idx]` in a step."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    is_initialized: bool = False


@dataclass(frozen=True, slots=True)
class CrossLayer:
    """Where one cross-attention layer's keys live and their shape on this rank."""

    device: torch.device
    dtype: torch.dtype
    kv_heads: int
    head_dim: int


@dataclass(frozen=True, slots=True)
class CrossAttentionShape:
    """A model's cross-attention layers and what one image sequence's state takes."""

    layers: dict[int, CrossLayer]
    num_layers: int  # every decoder layer (the model indexes `past_key_values.layers` by each)
    image_tokens: int  # keys per sequence: max_images x tiles per image x patches per tile
    mask_shape: tuple[int, int]  # (max_images, tiles per image): a row of the cross-attention mask

    def bytes_per_sequence(self) -> dict[str, int]:
        """One image sequence's keys and values on each device."""
        out: dict[str, int] = {}
        for layer in self.layers.values():
            size = torch.tensor([], dtype=layer.dtype).element_size()
            device = str(layer.device)
            out[device] = out.get(device, 0) + 2 * layer.kv_heads * self.image_tokens * layer.head_dim * size
        return out


def cross_attention_shape(model: Any, max_images: int) -> CrossAttentionShape | None:
    """The cross-attention layers of `model` (their modules' own head counts: a tensor-parallel rank's
    share), or None for a model without them."""
    text = model.config.get_text_config()
    indices = set(getattr(text, "cross_attention_layers", None) or ())
    if not indices:
        return None
    layers = {}
    for module in model.modules():
        if getattr(module, "layer_idx", None) in indices and type(module).__name__.endswith("CrossAttention"):
            weight = module.k_proj.weight
            layers[module.layer_idx] = CrossLayer(
                weight.device, weight.dtype, module.num_key_value_heads, module.head_dim
            )
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2 + 1  # and the class token
    images = max(max_images, 1)
    return CrossAttentionShape(
        layers=layers,
        num_layers=text.num_hidden_layers,
        image_tokens=images * vision.max_num_tiles * patches,
        mask_shape=(images, vision.max_num_tiles),
    )


class CrossAttentionSlots:
    """Image keys and values of up to `image_rows` running sequences, indexed by the batch's rows.

    Each cross-attention layer holds [image_rows + 1, kv heads, image_tokens, head dim] on its device;
    the last slot stays zero for text rows. A row's image slot is the row's own index when free (a
    decode step then reads the slots as a view of the first rows), else another; a step whose rows do
    not line up with their slots gathers them. Free slots are zero.
    """

    def __init__(self, shape: CrossAttentionShape, num_slots: int, image_rows: int) -> None:
        self.shape = shape
        self.image_rows = image_rows
        self.slot_of_row: list[int | None] = [None] * num_slots
        self._masks = torch.zeros((num_slots, *shape.mask_shape), dtype=torch.long)
        self._free = set(range(image_rows))
        self._store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.layers = [CrossLayerView() for _ in range(shape.num_layers)]

    @property
    def free_image_rows(self) -> int:
        return len(self._free)

    def allocate(self) -> None:
        """Every layer's slots, now (at load, so the memory is taken before serving)."""
        for idx, layer in self.shape.layers.items():
            if idx not in self._store:
                size = (self.image_rows + 1, layer.kv_heads, self.shape.image_tokens, layer.head_dim)
                self._store[idx] = tuple(  # type: ignore[assignment]
                    torch.zeros(size, dtype=layer.dtype, device=layer.device) for _ in range(2)
                )

    def allocated_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self._store.values())

    def load(self, row: int, prefill_cache: Any, mask_row: torch.Tensor) -> None:
        """An image prompt's cross-attention keys (its prefill's cache) and the last row of its mask
        ([images, tiles]: what its decode tokens attend to) into `row`."""
        self.clear(row)
        if not self._free:
            raise RuntimeError(f"no free cross-attention slot ({self.image_rows} image sequences running)")
        self.allocate()
        slot = row if row in self._free else min(self._free)
        self._free.remove(slot)
        for idx, (keys, values) in self._store.items():
            layer = prefill_cache.layers[idx]
            length = layer.keys.shape[2]
            keys[slot, :, :length] = layer.keys[0]
            values[slot, :, :length] = layer.values[0]
        images, tiles = mask_row.shape
        self._masks[row, :images, :tiles] = mask_row
        self.slot_of_row[row] = slot

    def clear(self, row: int) -> None:
        """`row` holds no image (a text sequence, or none): its slot is zeroed and freed."""
        slot = self.slot_of_row[row]
        if slot is not None:
            for keys, values in self._store.values():
                keys[slot].zero_()
                values[slot].zero_()
            self._free.add(slot)
            self.slot_of_row[row] = None
        self._masks[row].zero_()

    def move(self, source: int, target: int) -> None:
        """The sequence in `source` goes to `target` (whose own sequence has left); its image slot follows
        it, and moves to the slot of its new row's index when that one is free."""
        self.clear(target)
        slot, self.slot_of_row[source] = self.slot_of_row[source], None
        self._masks[target] = self._masks[source]
        self._masks[source].zero_()
        if slot is not None and slot != target and target in self._free:
            self._free.remove(target)
            for keys, values in self._store.values():
                keys[target], values[target] = keys[slot], values[slot]
                keys[slot].zero_()
                values[slot].zero_()
            self._free.add(slot)
            slot = target
        self.slot_of_row[target] = slot

    def copy(self, source: int, target: int) -> None:
        """`target` holds the same sequence as `source` (both keep it)."""
        self.clear(target)
        slot = self.slot_of_row[source]
        if slot is None:
            return
        new = target if target in self._free else min(self._free)
        self._free.remove(new)
        for keys, values in self._store.values():
            keys[new], values[new] = keys[slot], values[slot]
        self._masks[target] = self._masks[source]
        self.slot_of_row[target] = new

    def begin_step(self, num_rows: int, device: torch.device) -> torch.Tensor | None:
        """A decode step of rows 0..num_rows-1: each cross-attention layer's view of their image keys,
        and their mask rows [rows, 1, images, tiles] on `device`; None (the layers skipped) when no row
        holds an image."""
        slots = self.slot_of_row[:num_rows]
        if all(slot is None for slot in slots):
            self.deactivate()
            return None
        zero = self.image_rows
        index = [
            slot if slot is not None else (row if row in self._free else zero)
            for row, slot in enumerate(slots)
        ]
        gathered = index != list(range(num_rows))
        on: dict[torch.device, torch.Tensor] = {}
        for idx, (keys, values) in self._store.items():
            if gathered:
                if keys.device not in on:
                    on[keys.device] = torch.tensor(index, dtype=torch.long, device=keys.device)
                keys, values = keys.index_select(0, on[keys.device]), values.index_select(0, on[keys.device])
            else:
                keys, values = keys[:num_rows], values[:num_rows]
            self.layers[idx] = CrossLayerView(keys, values, True)
        return self._masks[:num_rows, None].to(device)

    def deactivate(self) -> None:
        """The next forward skips the cross-attention layers (no image row in it)."""
        for idx in self._store:
            self.layers[idx] = CrossLayerView()
