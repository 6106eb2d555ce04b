"""GLM-4V natively: the checkpoint's EVA2-CLIP vision tower, its 2x2 convolution and GLU projector beside
transformers' GLM, the image features spliced over the prompt's image positions, and its preprocessing
(resize, CLIP normalisation) without torchvision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, GlmConfig, GlmForCausalLM
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

MODEL_TYPE = "shardbento_glm4v"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BOI, EOI, PLACEHOLDER = "<|begin_of_image|>", "<|end_of_image|>", "<|endoftext|>"


@strict
class Glm4vNativeConfig(GlmConfig):
    """GLM's text config plus the checkpoint's vision_config and its image boundary token ids."""

    model_type = MODEL_TYPE
    vision_config: dict | None = None
    boi_token_id: int | None = None
    eoi_token_id: int | None = None


def image_tokens(vision: dict[str, Any]) -> int:
    """Positions one image fills between boi and eoi: the patch grid after the 2x2 convolution."""
    side = vision["image_size"] // vision["patch_size"] // 2
    return side * side


class _PatchEmbedding(nn.Module):
    def __init__(self, vision: dict[str, Any]) -> None:
        super().__init__()
        width, patch = vision["hidden_size"], vision["patch_size"]
        self.proj = nn.Conv2d(vision["in_channels"], width, kernel_size=patch, stride=patch)
        self.cls_embedding = nn.Parameter(torch.zeros(1, width))
        self.position_embedding = nn.Embedding(vision["num_positions"], width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.proj(images).flatten(2).transpose(1, 2)
        cls = self.cls_embedding.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight[None]


class _Attention(nn.Module):
    def __init__(self, vision: dict[str, Any]) -> None:
        super().__init__()
        self.num_heads = vision["num_heads"]
        self.query_key_value = nn.Linear(vision["hidden_size"], 3 * vision["hidden_size"])
        self.dense = nn.Linear(vision["hidden_size"], vision["hidden_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.query_key_value(x).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.dense(out.transpose(1, 2).reshape(batch, length, -1))


class _Mlp(nn.Module):
    def __init__(self, vision: dict[str, Any]) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision["hidden_size"], vision["intermediate_size"])
        self.fc2 = nn.Linear(vision["intermediate_size"], vision["hidden_size"])
        self.act = ACT2FN[vision.get("hidden_act", "gelu")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Layer(nn.Module):
    """EVA2-CLIP's block: each branch normalised after it, then added (not before, as in CLIP)."""

    def __init__(self, vision: dict[str, Any]) -> None:
        super().__init__()
        eps = vision.get("layer_norm_eps", 1e-6)
        self.input_layernorm = nn.LayerNorm(vision["hidden_size"], eps=eps)
        self.attention = _Attention(vision)
        self.mlp = _Mlp(vision)
        self.post_attention_layernorm = nn.LayerNorm(vision["hidden_size"], eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class _Layers(nn.Module):
    def __init__(self, vision: dict[str, Any]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(vision) for _ in range(vision["num_hidden_layers"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class _Glu(nn.Module):
    """The projector into the language model: a linear, LayerNorm and GELU, then SwiGLU."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.linear_proj = nn.Linear(hidden, hidden, bias=False)
        self.norm1 = nn.LayerNorm(hidden)
        self.dense_h_to_4h = nn.Linear(hidden, ffn, bias=False)
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.dense_4h_to_h = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(nn.functional.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class Glm4vVisionTower(nn.Module):
    """Images [n, 3, size, size] to [n, 2 + grid, hidden]: boi, the projected patch grid, eoi."""

    def __init__(self, config: Glm4vNativeConfig) -> None:
        super().__init__()
        vision = dict(config.vision_config or {})
        self.patch_embedding = _PatchEmbedding(vision)
        self.transformer = _Layers(vision)
        self.conv = nn.Conv2d(vision["hidden_size"], config.hidden_size, kernel_size=2, stride=2)
        self.linear_proj = _Glu(config.hidden_size, config.intermediate_size)
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.scaling_factor = float(vision.get("scaling_factor", 1.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.patch_embedding(images))[:, 1:]
        batch, length, width = x.shape
        side = int(length**0.5)
        x = self.conv(x.transpose(1, 2).reshape(batch, width, side, side))
        x = self.linear_proj(x.flatten(2).transpose(1, 2))
        ends = (self.boi.expand(batch, -1, -1), self.eoi.expand(batch, -1, -1))
        return torch.cat([ends[0], x, ends[1]], dim=1) / self.scaling_factor


@dataclass
class Glm4vOutput(CausalLMOutputWithPast):
    """GLM's output plus how far the positions after the prompt's images trail its length."""

    position_delta: int | None = None  # None: no image in the prompt


class Glm4vForConditionalGeneration(GlmForCausalLM):
    """GLM with the vision tower: a prompt holds boi, one placeholder per image position, eoi (as the
    processor below expands it); the tower's boi/patches/eoi replace their embeddings, every patch at
    boi's position + 1 and the text after eoi where the original's three tokens would put it."""

    config_class = Glm4vNativeConfig
    _no_split_modules = ["GlmDecoderLayer", "_Layer"]

    def __init__(self, config: Glm4vNativeConfig) -> None:
        super().__init__(config)
        self.vision = Glm4vVisionTower(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        common = {"attention_mask": attention_mask, "past_key_values": past_key_values, **kwargs}
        if pixel_values is None or input_ids is None:
            return super().forward(
                input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds, **common
            )
        embeds = self.get_input_embeddings()(input_ids)
        features = self.vision(pixel_values.to(self.vision.conv.weight.dtype)).to(embeds.dtype)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).repeat(input_ids.shape[0], 1)
        span = features.shape[1]
        delta = 0
        for row in range(input_ids.shape[0]):
            starts = (input_ids[row] == self.config.boi_token_id).nonzero().flatten().tolist()
            for image, start in enumerate(starts):
                embeds[row, start : start + span] = features[min(image, features.shape[0] - 1)].to(
                    embeds.device
                )
                positions[row, start + 1 : start + span - 1] = positions[row, start + 1]
                positions[row, start + span - 1 :] -= span - 3
            delta = -(span - 3) * len(starts)
        out = super().forward(inputs_embeds=embeds, position_ids=positions, **common)
        return Glm4vOutput(logits=out.logits, past_key_values=out.past_key_values, position_delta=delta)

    def position_deltas(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Per row, how far rotary positions trail the cache index after the prompt's images."""
        span = image_tokens(dict(self.config.vision_config or {})) + 2
        return -(span - 3) * (input_ids == self.config.boi_token_id).sum(dim=-1)

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, *args: Any, is_first_iteration: bool | None = False, **kwargs: Any
    ) -> dict[str, Any]:
        """generate() after the prefill: no pixels again, and positions that trail the cache index by
        the images' shared positions (what the batch runner keeps per KV slot)."""
        inputs = super().prepare_inputs_for_generation(
            input_ids, *args, is_first_iteration=is_first_iteration, **kwargs
        )
        cache = inputs.get("past_key_values")
        if is_first_iteration or cache is None or cache.get_seq_length() == 0:
            return inputs
        inputs.pop("pixel_values", None)
        past, steps = cache.get_seq_length(), inputs["input_ids"].shape[1]
        where = torch.arange(past, past + steps, device=input_ids.device)[None]
        inputs["position_ids"] = where + self.position_deltas(input_ids).to(where.device)[:, None]
        return inputs


AutoConfig.register(MODEL_TYPE, Glm4vNativeConfig)
AutoModelForImageTextToText.register(Glm4vNativeConfig, Glm4vForConditionalGeneration)


class Glm4vProcessor:
    """The tokenizer's chat template plus images: each image as boi, image_tokens placeholders, eoi, and
    its pixels resized (bicubic) to the tower's size and normalised as CLIP's."""

    def __init__(self, tokenizer: Any, vision: dict[str, Any]) -> None:
        self.tokenizer = tokenizer
        self.image_size = vision["image_size"]
        self.num_image_tokens = image_tokens(vision)
        self.chat_template = tokenizer.chat_template

    def apply_chat_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(conversation, **kwargs)

    def __call__(self, text: str, images: list[Any], return_tensors: str = "pt", **kwargs: Any) -> dict:
        encoded = self.tokenizer(text, add_special_tokens=kwargs.get("add_special_tokens", False))
        boi, placeholder = self.tokenizer.convert_tokens_to_ids([BOI, PLACEHOLDER])
        ids: list[int] = []
        for token in encoded["input_ids"]:
            if token == placeholder and ids and ids[-1] == boi:
                ids.extend([placeholder] * self.num_image_tokens)
            else:
                ids.append(token)
        tensor = torch.tensor([ids])
        return {
            "input_ids": tensor,
            "attention_mask": torch.ones_like(tensor),
            "pixel_values": self.pixels(images),
        }

    def pixels(self, images: list[Any]) -> torch.Tensor:
        from PIL import Image

        mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
        tensors = []
        for image in images:
            resized = image.convert("RGB").resize(
                (self.image_size, self.image_size), Image.Resampling.BICUBIC
            )
            pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8)
            pixels = pixels.view(self.image_size, self.image_size, 3).permute(2, 0, 1).float() / 255.0
            tensors.append((pixels - mean) / std)
        return torch.stack(tensors)
