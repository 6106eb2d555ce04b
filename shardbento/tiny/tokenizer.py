"""The tiny models' tokenizer: a built-in deterministic English corpus, byte-level BPE, ChatML template."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

ENDOFTEXT, IM_START, IM_END, IMAGE = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"

_SEED = 20240601

_NOUNS_TEXT = """
time year people way day man woman child world life hand part place case week company system program
question work government number night point home water room mother area money story fact month lot right
study book eye job word business issue side kind head house service friend father power hour game line
end member law car city community name president team minute idea kid body information back parent face
others level office door health person art war history party result change morning reason research girl
guy moment air teacher force education foot boy age policy process music market sense nation plan college
interest death experience effect class control care field development role effort rate heart drug show
leader light voice wife police mind price report decision son view relationship town road arm difference
value building action model season society tax director position player record paper space ground form
event official matter center couple site project activity star table need court oil situation cost
industry figure street image phone data picture practice piece land product doctor wall patient worker
news test movie north love support technology step baby computer type attention film tree source
organization hair window evidence population site river garden bridge mountain island forest engine
server request response token model layer memory cache shard kernel tensor matrix vector device cluster
node queue thread process signal message stream packet socket buffer file folder key value answer
language sentence letter animal bird fish horse dog cat apple bread cheese coffee tea sugar salt
"""

_VERBS_TEXT = """
be have do say go get make know think take see come want look use find give tell work call try ask need
feel become leave put mean keep let begin seem help talk turn start show hear play run move like live
believe hold bring happen write provide sit stand lose pay meet include continue set learn change lead
understand watch follow stop create speak read allow add spend grow open walk win offer remember love
consider appear buy wait serve die send expect build stay fall cut reach kill remain suggest raise pass
sell require report decide pull return explain hope develop carry break receive agree support hit produce
eat cover catch draw choose cause point listen realize place close involve increase compute load save
split merge sort count measure schedule allocate generate stream decode encode batch shard
"""

_ADJECTIVES_TEXT = """
other new good high old great big American small large national young different black long little
important political bad white real best right social only public sure low early able human local late
hard major better economic strong possible whole free military true federal international full special
easy clear recent certain personal open red difficult available likely short single medical current wrong
private past foreign fine common poor natural significant similar hot dead central happy serious ready
simple left physical general environmental financial blue democratic dark various entire close legal
religious cold final main green nice huge popular traditional cultural quick quiet bright gentle tiny
random greedy sharded parallel fast slow empty busy warm careful honest brave clever calm
"""

_ADVERBS_TEXT = """
up so out just now how then more also here well only very even back there down still in as too when never
really most often always sometimes usually quickly slowly carefully quietly together again soon
"""

_FUNCTION_WORDS_TEXT = """
the a an of to and in that it for on with as at by from this but his they her she or will my one all
would there their what about which when make can like no just him know into your some could them than
other then now only its over also after use two how our first well way even new want because any these
give most us is are was were has had been being do does did not if we you he i me who whom whose why
"""

_NAMES_TEXT = """
Alice Bob Carol Dave Eve Frank Grace Heidi Ivan Judy Mallory Oscar Peggy Trent Victor Walter London Paris
Berlin Tokyo Cairo Lima Oslo Rome Monday Tuesday Wednesday Thursday Friday Saturday Sunday January
February March April May June July August September October November December
"""

_NOUNS = _NOUNS_TEXT.split()
_VERBS = _VERBS_TEXT.split()
_ADJECTIVES = _ADJECTIVES_TEXT.split()
_ADVERBS = _ADVERBS_TEXT.split()
_FUNCTION_WORDS = _FUNCTION_WORDS_TEXT.split()
_NAMES = _NAMES_TEXT.split()

_SENTENCES = """
The quick brown fox jumps over the lazy dog.
Hello! How can I help you today?
I am a helpful assistant. Please tell me what you need.
Once upon a time, in a small village by the sea, there lived an old fisherman and his wife.
Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex.
Complex is better than complicated. Flat is better than nested. Sparse is better than dense.
Readability counts. Errors should never pass silently, unless explicitly silenced.
In the face of ambiguity, refuse the temptation to guess.
Now is better than never, although never is often better than right now.
If the implementation is hard to explain, it's a bad idea.
What is the capital of France? The capital of France is Paris.
Describe the image in one sentence. The picture shows a red square on a white background.
Please write a short poem about the ocean, the wind and the stars.
def main() -> None:
    print("hello, world")
for i in range(10):
    total += i * 2
{"role": "user", "content": "What time is it?"}
Q: Why is the sky blue? A: Because air scatters blue light more than red light.
""".strip().splitlines()

_PUNCTUATION = [".", ".", ".", "!", "?", ";", ","]


def _sentence(rng: random.Random) -> str:
    """One grammatical-ish sentence built from the word lists."""
    subject = (
        f"{rng.choice(['the', 'a', 'my', 'our', 'this'])} {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
    )
    if rng.random() < 0.3:
        subject = rng.choice(_NAMES)
    verb = rng.choice(_VERBS)
    obj = f"{rng.choice(_FUNCTION_WORDS)} {rng.choice(_NOUNS)}"
    tail = f" {rng.choice(_ADVERBS)}" if rng.random() < 0.5 else ""
    number = f" {rng.randint(0, 2048)} times" if rng.random() < 0.15 else ""
    text = f"{subject} will {verb} {obj}{tail}{number}{rng.choice(_PUNCTUATION)}"
    return text[0].upper() + text[1:]


def corpus_lines(num_sentences: int = 4000) -> Iterator[str]:
    """Yield the fixed sentences, every vocabulary word in three casings, then seeded random sentences."""
    yield from _SENTENCES
    for words in (_NOUNS, _VERBS, _ADJECTIVES, _ADVERBS, _FUNCTION_WORDS, _NAMES):
        yield " ".join(words)
        yield " ".join(word.capitalize() for word in words)
        yield " ".join(word.upper() for word in words)
    yield " ".join(str(number) for number in range(1000))
    rng = random.Random(_SEED)
    for _ in range(num_sentences):
        yield _sentence(rng)


def train_tokenizer(
    vocab_size: int,
    vision: bool,
    model_max_length: int,
    template: str | None = None,
    text_tokens: tuple[str, ...] = (),
    added_tokens: tuple[str, ...] = (),
    eos_token: str = IM_END,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the built-in corpus; the special tokens take the first ids. `template`
    replaces the ChatML one; `text_tokens` are added as single tokens that decoded text keeps (a real
    model's `<think>`, `<tool_call>`). `added_tokens` replaces ChatML's specials with a real model's
    added tokens, in its order after the learned vocabulary (those in `text_tokens` stay text)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[] if added_tokens else [ENDOFTEXT, IM_START, IM_END] + ([IMAGE] if vision else []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus_lines(), trainer)
    for token in added_tokens or text_tokens:  # one at a time: each takes the next id
        text = token in text_tokens
        add = backend.add_tokens if text else backend.add_special_tokens
        add([AddedToken(token, special=not text, normalized=False)])
    extra = {"extra_special_tokens": {"image_token": IMAGE}} if vision else {}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eos_token,
        pad_token=ENDOFTEXT,
        model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],
        **extra,
    )
    tokenizer.chat_template = template or chat_template(vision)
    return tokenizer


TOOL_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOL_INSTRUCTIONS = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\n</tool_call>'
)


def chat_template(vision: bool) -> str:
    """ChatML with Hermes-style tools (Qwen2.5's layout): `tools` listed in the system turn, assistant
    `tool_calls` as `<tool_call>` JSON, `tool` messages as `<tool_response>` in a user turn. Content may
    be a string or a list of parts, image parts becoming `<image>` when `vision`."""
    image_branch = "{%- elif part['type'] == 'image' -%}{{- '" + IMAGE + "' -}}" if vision else ""
    content = (
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- elif message['content'] is iterable -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'text' -%}{{- part['text'] -}}" + image_branch + "{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
    )
    return (
        "{%- if tools -%}"
        "{{- '" + IM_START + "system\\n' -}}"
        "{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + '\\n\\n' -}}{%- endif -%}"
        "{{- '" + TOOL_PREAMBLE + "' -}}"
        "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
        "{{- '" + TOOL_INSTRUCTIONS + IM_END + "\\n' -}}"
        "{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if tools and loop.first and message['role'] == 'system' -%}"
        "{%- elif message['role'] == 'tool' -%}"
        "{{- '"
        + IM_START
        + "user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>"
        + IM_END
        + "\\n' -}}"
        "{%- else -%}"
        "{{- '"
        + IM_START
        + "' + message['role'] + '\\n' -}}"
        + content
        + "{%- for call in message.get('tool_calls') or [] -%}"
        "{{- '\\n<tool_call>\\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": '"
        " + (call['function']['arguments'] | tojson) + '}\\n</tool_call>' -}}"
        "{%- endfor -%}"
        "{{- '" + IM_END + "\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '" + IM_START + "assistant\\n' -}}{%- endif -%}"
    )


def make_tokenizer_config_portable(path: Path) -> None:
    """Name the class both transformers 4 and 5 know (5 writes `TokenizersBackend`, which 4 cannot load)."""
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if config.get("extra_special_tokens") == []:
        del config["extra_special_tokens"]  # transformers 4 expects a dict here
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
