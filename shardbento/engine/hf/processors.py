"""Vision processors built without torchvision: Qwen2-VL's and Qwen2.5-VL's processor with the PIL image
processor and no video processor (transformers' AutoProcessor loads a video processor that needs
torchvision, which does not import beside our CPU torch; images are all we serve)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import ProcessorMixin, Qwen2_5_VLProcessor, Qwen2VLProcessor

QWEN_VL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl"})


class _ImageOnly:
    """Qwen-VL's processor over a tokenizer and an image processor: its image-token expansion, its
    `mm_token_type_ids` (the multimodal rotary positions need them), no video processor."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None) -> None:
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)  # type: ignore[arg-type]


class Qwen2VLImageProcessor(_ImageOnly, Qwen2VLProcessor):
    """Qwen2-VL's processor for images only."""


class Qwen25VLImageProcessor(_ImageOnly, Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor for images only."""


def qwen_vl_processor(path: str, model_type: str, **common: Any) -> Any:
    """The checkpoint's tokenizer, its image settings (preprocessor_config.json) in the PIL image
    processor, and its chat template (chat_template.json, else the tokenizer's)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(path, **common)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **common)
    template = _chat_template(path, common.get("revision")) or tokenizer.chat_template
    processor_class = Qwen25VLImageProcessor if model_type == "qwen2_5_vl" else Qwen2VLImageProcessor
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def _chat_template(path: str, revision: str | None) -> str | None:
    """The checkpoint's chat_template.json (a local directory or the hub's), if it has one."""
    from transformers.utils import cached_file

    found = cached_file(
        path, "chat_template.json", revision=revision, _raise_exceptions_for_missing_entries=False
    )
    return json.loads(Path(found).read_text()).get("chat_template") if found else None
