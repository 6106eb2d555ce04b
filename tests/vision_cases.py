"""Images, chats and generate() references shared by the vision-family tests (Mllama, Qwen2.5-VL)."""

from __future__ import annotations

import base64
import io
from typing import Any

import torch
from PIL import Image

from shardbento.engine.base import ChatMessage, Prompt

QUESTIONS = ["What is in the picture?", "Describe the colours you see.", "Which animal is it?"]
TEXTS = [
    "Tell me a story about cats and trains.",
    "Why do rivers bend, Alice?",
    "Explain the sharded bento to a busy teacher.",
]


def picture(seed: int, width: int = 40, height: int = 56) -> Image.Image:
    pixels = torch.randint(
        0, 256, (height, width, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )
    return Image.fromarray(pixels.numpy())


def png(seed: int, width: int = 40, height: int = 56) -> bytes:
    buffer = io.BytesIO()
    picture(seed, width, height).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(seed: int, width: int = 40, height: int = 56) -> str:
    return f"data:image/png;base64,{base64.b64encode(png(seed, width, height)).decode()}"


def image_chat(seed: int, question: str, width: int = 40, height: int = 56) -> list[ChatMessage]:
    """One user turn with a picture (sizes vary: Mllama tiles them, Qwen2-VL resizes to a grid)."""
    return [ChatMessage(role="user", text=question, images=(picture(seed, width, height),))]


def text_chat(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", text=text)]


def mixed_chats(count: int) -> list[list[ChatMessage]]:
    """Image and text chats alternating, images of several shapes (1 to 4 tiles, 1 to 16 tokens)."""
    chats = []
    for i in range(count):
        if i % 2 == 0:
            chats.append(image_chat(i, QUESTIONS[i % 3], width=32 + 24 * (i % 3), height=56 - 8 * (i % 2)))
        else:
            chats.append(text_chat(TEXTS[i % 3]))
    return chats


def generate_tokens(loaded: Any, prompt: Prompt, max_tokens: int, **sampling: Any) -> list[int]:
    """transformers' generate() on the loaded reference model, greedy, exactly `max_tokens` tokens."""
    inputs = dict(prompt.inputs) if prompt.num_images else {"input_ids": torch.tensor([prompt.token_ids])}
    with torch.inference_mode():
        out = loaded.model.generate(
            **inputs,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            **sampling,
        )
    return out[0, len(prompt.token_ids) :].tolist()
