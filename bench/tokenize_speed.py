"""How fast the ChatML encoder tokenizes: 10,000 turns (5,000 conversations), best of 5.

    python bench/tokenize_speed.py
"""

import time

import torch

from qwen_tune.chatml import ChatMLEncoder
from qwen_tune.tokenizer import load_tokenizer


def main() -> None:
    torch.set_num_threads(1)
    tokenizer = load_tokenizer()
    convs = [[{"role": "user", "content": f"Question number {i}: what is {i} + {i}? 你好"},
              {"role": "assistant", "content": f"It is {2 * i}. 🙂 The answer has a few more words."}] for i in range(5000)]
    encoder = ChatMLEncoder(tokenizer, system_message="")
    best = min(_timed(encoder, convs) for _ in range(5))
    print(f"10,000 turns encoded with labels in {best * 1000:.0f} ms ({10000 / best:,.0f} turns/s)")


def _timed(encoder, convs) -> float:
    start = time.perf_counter()
    encoder.encode_many(convs)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
