"""In-process model.generate figures for the side-by-side run: prefill time, batch-1 TPOT, padded-batch tok/s,
with torch's default kernels and again with the oneDNN packed linears and malloc settings shardbento's CPU engine
uses (`packed`).

Run as its own process (side_by_side.py does) so its thread pools never compete with a server's.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shardbento.bench.loadgen import PROMPT_WORDS
from shardbento.engine.hf.cpu_kernels import keep_freed_memory, pack_linear_weights


def prompts(tokenizer, count: int, input_tokens: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        text = " ".join(rng.choice(PROMPT_WORDS) for _ in range(input_tokens))
        messages = [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        out.append(list(ids)[-input_tokens:])
    return out


def generate_s(model, batch: list[list[int]], output_tokens: int, pad_id: int) -> float:
    """Seconds for one padded (left) batch to produce exactly `output_tokens` each."""
    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    start = time.perf_counter()
    model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=output_tokens,
        min_new_tokens=output_tokens,
        do_sample=False,
        pad_token_id=pad_id,
    )
    return time.perf_counter() - start


def prefill_s(model, prompt: list[int]) -> float:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    model(input_ids=ids, logits_to_keep=1)
    return time.perf_counter() - start


def measure(model, tokenizer, pad_id: int, args: argparse.Namespace) -> dict:
    result: dict = {"levels": {}}
    with torch.inference_mode():
        single = prompts(tokenizer, args.rounds + 1, args.input_tokens, seed=99)
        generate_s(model, single[:1], 4, pad_id)  # warm-up
        prefill = statistics.median(prefill_s(model, p) for p in single)
        one = statistics.median(generate_s(model, [p], args.output_tokens, pad_id) for p in single[1:])
        result["prefill_ms"] = round(prefill * 1000, 2)
        result["tpot_ms"] = round((one - prefill) / (args.output_tokens - 1) * 1000, 3)
        for level in (int(c) for c in args.levels.split(",")):
            times = [
                generate_s(
                    model, prompts(tokenizer, level, args.input_tokens, seed=r), args.output_tokens, pad_id
                )
                for r in range(args.rounds)
            ]
            result["levels"][str(level)] = round(level * args.output_tokens / statistics.median(times), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--input-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result = measure(model, tokenizer, pad_id, args)
    # the same model on the kernels and allocator settings shardbento's CPU engine uses
    pack_linear_weights(model)
    keep_freed_memory()
    result["packed"] = measure(model, tokenizer, pad_id, args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
