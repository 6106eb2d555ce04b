"""The original THUDM tokenizers' behaviour, rebuilt from the reference libraries, for the THUDM tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from shardbento.thudm.tokenizer import CHATGLM3_SPECIALS, GLM4_PATTERN, GLM4_SPECIALS, read_tiktoken


def sentencepiece_reference(source: Path) -> tuple[Callable[[str], list[int]], dict[str, int]]:
    """ChatGLM3's SPTokenizer: `sentencepiece` on tokenizer.model, the specials numbered after its pieces."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    specials = {token: processor.vocab_size() + index for index, token in enumerate(CHATGLM3_SPECIALS)}
    return processor.encode, specials


def tiktoken_reference(source: Path) -> tuple[object, dict[str, int]]:
    """tiktoken itself over the checkpoint's ranks, with GLM-4's pattern and specials."""
    import tiktoken

    ranks = read_tiktoken(source / "tokenizer.model")
    specials = {token: len(ranks) + index for index, token in enumerate(GLM4_SPECIALS)}
    encoding = tiktoken.Encoding(
        name="tiny-glm4", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )
    return encoding, specials


def build_chat_input(specials: dict[str, int], encode, messages: list[dict]) -> list[int]:
    """What the original tokenizers' build_chat_input assembles: [gMASK] sop, then per message the role
    tag, encode(metadata + "\\n"), encode(content); then <|assistant|>."""
    ids = [specials["[gMASK]"], specials["sop"] if "sop" in specials else specials["<sop>"]]
    for message in messages:
        ids += [specials[f"<|{message['role']}|>"], *encode("\n"), *encode(message["content"])]
    return [*ids, specials["<|assistant|>"]]
