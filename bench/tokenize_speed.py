"""Conversations per second through the served-format encoder, next to a plain-ChatML encoder.

    python bench/tokenize_speed.py [--conversations 5000]

Rows (best of 3, one thread, the embedded tokenizer, two-turn conversations with Chinese and emoji):
- plain ChatML: the reference, what qwen-tune did before templates: `<|im_start|>{role}\\n` and the
  content encoded separately and concatenated, labels by position; no template, no offsets.
- ChatFormat, ChatML: the embedded model's format through the general path (Jinja render, split at
  control tokens, one batched tokenizer call with offsets, labels from character spans).
- ChatFormat, qwen3 / qwen3_5_think: official templates (think blocks; the second with tools too).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from qwen_tune.data.chat_format import IGNORE, resolve_format
from qwen_tune.models.tokenizer import load_tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def plain_chatml(tokenizer, conversations):
    """The reference encoder: control tokens by id, role headers and contents encoded as plain text."""
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    texts = [t for c in conversations for m in c for t in (m["role"] + "\n", m["content"])] + ["\n"]
    backend = tokenizer.backend_tokenizer  # straight to Rust: the fastest way to call this tokenizer
    backend.encode_special_tokens = True
    ids = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    backend.encode_special_tokens = False
    newline, k, out = ids[-1], 0, []
    for c in conversations:
        input_ids, labels = [], []
        for m in c:
            header, content = [im_start] + ids[k], ids[k + 1]
            k += 2
            input_ids += header + content + [im_end] + newline
            body = content + [im_end] if m["role"] == "assistant" else [IGNORE] * (len(content) + 1)
            labels += [IGNORE] * len(header) + body + [IGNORE] * len(newline)
        out.append((input_ids, labels))
    return out


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=5000)
    a = p.parse_args()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer()
    convs = [[{"role": "user", "content": f"Question number {i}: what is {i} + {i}? 你好"},
              {"role": "assistant", "content": f"It is {2 * i}. 🙂 The answer has a few more words."}] for i in range(a.conversations)]
    n = len(convs)
    rows = [("plain ChatML (reference)", best_of(3, lambda: plain_chatml(tokenizer, convs)), plain_chatml(tokenizer, convs))]
    chatml = resolve_format(copy.copy(tokenizer), system_message="")
    assert [e.input_ids for e in chatml.encode_many(convs[:50])] == [ids for ids, _ in plain_chatml(tokenizer, convs[:50])]
    rows.append(("ChatFormat, ChatML", best_of(3, lambda: chatml.encode_many(convs)), chatml.encode_many(convs)))
    qwen3 = resolve_format(copy.copy(tokenizer), "qwen3")
    rows.append(("ChatFormat, qwen3", best_of(3, lambda: qwen3.encode_many(convs)), qwen3.encode_many(convs)))
    qwen35 = resolve_format(copy.copy(tokenizer), "qwen3_5_think")
    with_tools = [(c, TOOLS) for c in convs]
    rows.append(("ChatFormat, qwen3_5_think + tools", best_of(3, lambda: qwen35.encode_many(with_tools)),
                 qwen35.encode_many(with_tools)))
    reference = rows[0][1]
    print(f"{n:,} conversations, one thread\n")
    print("| encoder | conversations/s | tokens/s | time per conversation vs plain ChatML |")
    print("|---|---:|---:|---:|")
    for name, seconds, encoded in rows:
        tokens = sum(len(e[0]) if isinstance(e, tuple) else len(e.input_ids) for e in encoded)
        print(f"| {name} | {n / seconds:,.0f} | {tokens / seconds:,.0f} | {seconds / reference:.2f}x |")


if __name__ == "__main__":
    main()
