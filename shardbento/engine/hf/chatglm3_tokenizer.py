"""The converted ChatGLM3 tokenizer's class: the fast tokenizer's encoding with SentencePiece's decoding
(thudm/sentencepiece_text.py), loaded where tokenizer_config.json names it."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from shardbento.thudm.sentencepiece_text import PieceDecoding, decode_tokens
from shardbento.thudm.tokenizer import CHATGLM3_TOKENIZER_CLASS


class ConvertedChatGLM3Tokenizer(PreTrainedTokenizerFast):
    """Decodes as ChatGLM3's SPTokenizer does: each run of SentencePiece ids through SentencePiece's rules
    (a `tokenizers` decoder sees one token at a time, so it cannot read an invalid byte run per character)."""

    # No __init__ of its own: transformers then loads tokenizer.json as saved instead of rebuilding it.

    @functools.cached_property
    def _decoding(self) -> PieceDecoding:
        return PieceDecoding.from_dict(self.init_kwargs["sentencepiece_decoding"])

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        if isinstance(token_ids, dict):
            token_ids = token_ids["input_ids"]
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        skipped = set(self.all_special_ids) if skip_special_tokens else set()
        return decode_tokens(self.convert_ids_to_tokens(ids), ids, self._decoding, skipped)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return decode_tokens(tokens, self.convert_tokens_to_ids(tokens), self._decoding, set())


def load_converted(path: str) -> ConvertedChatGLM3Tokenizer | None:
    """The converted ChatGLM3 tokenizer in the directory `path`, or None if `path` holds another one.
    (AutoTokenizer would not pick this class: for a GLM config it always loads the plain fast tokenizer.)"""
    config_path = Path(path) / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    if json.loads(config_path.read_text()).get("tokenizer_class") != CHATGLM3_TOKENIZER_CLASS:
        return None
    return ConvertedChatGLM3Tokenizer.from_pretrained(path)
