"""The tiny THUDM-layout checkpoints' tokenizer files: a bilingual corpus with indented code, a SentencePiece
model trained with ChatGLM3's options, tiktoken ranks learned over GLM-4's split pattern."""

from __future__ import annotations

import base64
import io
import json
import random
from collections.abc import Iterator
from pathlib import Path

from shardbento.thudm.tiktoken_model import GLM4_PATTERN, byte_alphabet
from shardbento.tiny.tokenizer import corpus_lines

_CHINESE_WORDS = (
    "我们", "你们", "他们", "今天", "明天", "昨天", "时间", "世界", "中国", "北京", "上海", "学生", "老师", "朋友", "工作", "学习", "问题",
    "模型", "数据", "计算", "服务", "请求", "回答", "语言", "图片", "文字", "天气", "城市", "电脑", "手机", "音乐", "电影", "书", "水",
    "山", "河", "花", "猫", "狗", "鱼", "鸟", "吃饭", "喝茶", "睡觉", "跑步", "喜欢", "知道", "认为", "希望", "需要", "可以", "应该",
    "已经", "非常", "很", "也", "都", "还", "就", "在", "是", "有", "和", "的", "了", "吗", "呢", "吧", "不", "没有", "一个",
    "两个", "三个", "大", "小", "多", "少", "好", "新", "快", "慢", "高", "低", "长", "短", "红色", "蓝色", "你好", "谢谢", "再见",
    "请问", "为什么", "怎么样", "什么", "哪里",
)  # fmt: skip
_CHINESE_PUNCTUATION = ["。", "，", "！", "？", "；", "、"]
_CODE_NAMES = ("total", "count", "value", "items", "result", "index", "name", "data", "row", "key")


def bilingual_lines(num_sentences: int = 1500) -> Iterator[str]:
    """The tiny models' English corpus interleaved with seeded Chinese sentences and mixed lines."""
    rng = random.Random(20240605)
    yield " ".join(_CHINESE_WORDS)
    for index, english in enumerate(corpus_lines(num_sentences)):
        chinese = "".join(rng.choice(_CHINESE_WORDS) for _ in range(rng.randint(3, 9)))
        yield chinese + rng.choice(_CHINESE_PUNCTUATION)
        yield english if index % 3 else f"{english} {chinese}{rng.choice(_CHINESE_PUNCTUATION)}"


def code_lines(num_snippets: int = 150) -> Iterator[str]:
    """Seeded Python, JSON, Markdown tables and C-like code, one line at a time (as a SentencePiece trainer
    reads its corpus): runs of spaces and tabs for the whitespace pieces real vocabularies have."""
    rng = random.Random(20240606)
    for index in range(num_snippets):
        name, left, right = (rng.choice(_CODE_NAMES) for _ in range(3))
        yield from (
            f"def {name}_{index % 7}({left}, {right}):",
            f"    if {left} > {right}:",
            f"        return {left} - {right}",
            f"    for {name} in range({index}):",
            f"        {right} += {name}  # two  spaces",
            f"    return {right}",
        )
        document = {left: index, right: [name, index * 3], "nested": {name: index % 2 == 0}}
        yield from json.dumps(document, indent=2 if index % 2 else 4).splitlines()
        yield f"| {left:<8} | {right:>6} |"
        yield f"| {index:<8} | {index * 7:>6} |"
        yield from (f"\tif ({left}) {{", f"\t\t{right}();", "\t}")


def training_lines() -> Iterator[str]:
    """Both tiny THUDM tokenizers' training corpus."""
    yield from bilingual_lines()
    yield from code_lines()


def write_sentencepiece(vocab_size: int, path: Path) -> int:
    """A BPE SentencePiece model trained here with ChatGLM3's options (byte fallback, digits split, a
    dummy prefix, no normalization, whitespace-only pieces); returns its number of pieces."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=training_lines(),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue()).vocab_size()


def write_tiktoken(vocab_size: int, path: Path) -> int:
    """tiktoken ranks learned here as a byte-level BPE over GLM-4's split pattern: the 256 bytes first,
    then each merge's token in the order learned; returns the number of ranks."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(training_lines(), trainer=trainer)
    from_text = {char: byte for byte, char in byte_alphabet().items()}
    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    for merge in json.loads(tokenizer.to_str())["model"]["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        token = bytes(from_text[c] for c in left + right)
        ranks.setdefault(token, len(ranks))
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return len(ranks)
