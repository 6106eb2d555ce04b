"""Seeded texts and token id sequences for comparing converted tokenizers with their reference libraries."""

from __future__ import annotations

import json
import random
import re

# Pieces a random text is drawn from: letters and words, whitespace of every kind and length, code,
# CJK (common, rare, outside the BMP), emoji (modifiers, ZWJ sequences), controls and rare characters.
FRAGMENTS = (
    *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    *"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    " ",
    " ",
    " ",
    "  ",
    "   ",
    "    ",
    "        ",
    "\t",
    "\t\t",
    "\n",
    "\n\n",
    "\r\n",
    "\r",
    " \n",
    "\n    ",
    "\u3000",
    "\u00a0",
    "\x0b",
    "\x0c",
    "\x1c",
    "\u0085",
    "\u2028",
    "\u2029",
    "\u200b",
    "\ufeff",
    "\u2581",
    "the",
    " the",
    "model",
    " token",
    "return",
    "def ",
    "if ",
    "    return ",
    "():",
    "{}",
    "[]",
    "=>",
    "!=",
    "'s",
    "'LL",
    "'t",
    "1234",
    "2048",
    "3.14",
    "-1",
    "0x1F",
    "<0x41>",
    "<s>",
    "<|",
    "|>",
    "[MASK",
    "你好",
    "世界",
    "我们",
    "模型",
    "，",
    "。",
    "！",
    "龘",
    "𠀀",
    "𪚥",
    "中文",
    "日本語",
    "한국어",
    "😀",
    "🍱",
    "👍🏽",
    "👨‍👩‍👧",
    "🇨🇳",
    "❤️",
    "\x00",
    "\x7f",
    "é",
    "e\u0301",
    "ß",
    "ǅ",
    "ⅷ",
    "٣",
    "ﬁ",
    "Ａ",
    "ｶﾞ",
    "\U0010fffd",
    "\ud7ff",
    "Ω",
    "∑",
    "→",
    "—",
    "…",
    "·",
    "©",
)
_NAMES = ("total", "count", "value", "items", "result", "index", "name", "data", "row", "key", "用户", "数据")


def random_texts(rng: random.Random, count: int) -> list[str]:
    """`count` texts of 0 to 60 fragments, the empty text and single fragments among them."""
    return [
        "".join(rng.choices(FRAGMENTS, k=rng.choice((0, 1, 2, rng.randint(3, 60))))) for _ in range(count)
    ]


def python_snippet(rng: random.Random) -> str:
    name, left, right = (rng.choice(_NAMES) for _ in range(3))
    indent = rng.choice(("    ", "  ", "\t"))
    body = [
        f"def {name}({left}, {right}={rng.randint(0, 99)}):",
        f'{indent}"""Docstring  with  two  spaces."""',
        f"{indent}if {left} > {right}:",
        f"{indent * 2}return {left} - {right}  # 差值",
        f"{indent}for i in range({rng.randint(1, 9)}):",
        f"{indent * 2}{right} += i ** 2",
        "",
        f"{indent}return {{'{name}': {right}, \"ok\": True}}",
    ]
    return rng.choice(("", " ", "\n", "  ")) + "\n".join(body) + rng.choice(("", "\n", "\n\n", "  "))


def markdown_table(rng: random.Random) -> str:
    rows = [f"| {rng.choice(_NAMES):<8} | {rng.randint(0, 9999):>6} | {rng.random():.3f} |" for _ in range(4)]
    return "\n".join(["| name     |  count | ratio |", "|----------|-------:|------:|", *rows])


def json_document(rng: random.Random) -> str:
    document = {
        rng.choice(_NAMES): [rng.randint(-5, 5), rng.random(), None, "文字 with  spaces"],
        "nested": {rng.choice(_NAMES): {"deep": [True, False, "\t tab"]}},
        "emoji": "🍱 ok",
    }
    return json.dumps(document, indent=rng.choice((None, 2, 4)), ensure_ascii=rng.random() < 0.5)


def real_texts(rng: random.Random, count: int) -> list[str]:
    """Python with indentation, Markdown tables, JSON, and the issue's own examples."""
    makers = (python_snippet, markdown_table, json_document)
    examples = ["def add(a, b):\n    return", "a  b", " leading", "trailing ", "\tx\n\t\ty"]
    return examples + [rng.choice(makers)(rng) for _ in range(count - len(examples))]


def without(texts: list[str], specials: tuple[str, ...]) -> list[str]:
    """Texts with the specials' own strings broken up: in a converted tokenizer they are specials (so the
    chat template can name them), in the reference library's plain encoding they are text."""
    pattern = re.compile("|".join(map(re.escape, specials)))
    cleaned = []
    for text in texts:
        while pattern.search(text):  # dropping a character can join a new one ("ssopp")
            text = pattern.sub(lambda match: match.group()[:-1], text)
        cleaned.append(text)
    return cleaned


def random_ids(
    rng: random.Random, count: int, normal: list[int], byte_ids: list[int], other: list[int]
) -> list[list[int]]:
    """Id sequences mixing normal pieces, runs of byte pieces (valid UTF-8, cut short, or random bytes)
    and the rest (control, unknown)."""
    sequences = []
    for _ in range(count):
        ids: list[int] = []
        for _ in range(rng.randint(0, 12)):
            kind = rng.random()
            if kind < 0.4:
                ids += rng.choices(normal, k=rng.randint(1, 3))
            elif kind < 0.9:
                data = rng.choice(FRAGMENTS).encode() if kind < 0.6 else rng.randbytes(rng.randint(1, 5))
                data = data[: rng.randint(1, len(data))] if data and kind < 0.7 else data
                ids += [byte_ids[b] for b in data]
            else:
                ids.append(rng.choice(other))
        sequences.append(ids)
    return sequences
