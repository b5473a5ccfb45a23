"""`qwen-tune preprocess`: validate and tokenize data, write what the model will be trained on.

Renders with the chat template of `--tokenizer` (a checkpoint or tokenizer directory) or `--chat_template`,
as training would, and prints the format used and a summary; `--show N` prints N samples with supervised spans
marked. `--out DIR` writes the tokenized data as a memory-mapped tokens directory (data/cache.py) that
`sft --data_path DIR` trains from; `--out FILE.jsonl` writes one JSON object per kept sample (`id`, `input_ids`,
`labels` with -100 for masked positions).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..options.groups import set_chat_format
from ..options.tools import add_cache_arguments, add_format_arguments, add_trust_argument, cache_options, format_options
from ..data.chat_format import IGNORE
from ..data.cache import build_tokens, load_tokens
from ..models.tokenizer import load_tokenizer

START, END = "\033[1;32m", "\033[0m"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-tune preprocess", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="a data file (.json, .jsonl, .parquet, ...; see the README), a directory, or a comma-separated list (weighted: a.jsonl:0.7,b.parquet:0.3)")
    p.add_argument("--tokenizer", default=None, help="a checkpoint or tokenizer directory; its tokenizer and chat template are used (unset: the embedded Qwen tokenizer, ChatML)")
    p.add_argument("--model_max_length", type=int, default=512, help="truncate longer samples (head kept; counted)")
    p.add_argument("--out", default=None, help="a directory: write the tokens there for sft --data_path DIR; a .jsonl file: "
                   "the kept samples as JSON lines")
    p.add_argument("--show", type=int, default=0, help="print N samples with supervised spans highlighted")
    add_trust_argument(p)
    add_format_arguments(p)
    add_cache_arguments(p)  # --tokens_cache is not used with --out DIR
    return p


def highlight(tokenizer, input_ids: list[int], labels: list[int], color: bool) -> str:
    """Decode a sample, marking supervised spans with [[...]] (or green when printing to a terminal)."""
    start, end = (START, END) if color else ("[[", "]]")
    parts, span, supervised = [], [], None
    for tok, label in zip(input_ids + [None], labels + [None]):
        is_sup = label is not None and label != IGNORE
        if tok is None or (supervised is not None and is_sup != supervised):
            text = tokenizer.decode(span)
            parts.append(f"{start}{text}{end}" if supervised else text)
            span = []
        if tok is not None:
            span.append(tok)
            supervised = is_sup
    return "".join(parts)


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    from ..models.model import resolve_model_path

    source = resolve_model_path(a.tokenizer)  # unset: the embedded model's, so `sft --data_path OUT` on it matches
    tokenizer = load_tokenizer(source, trust_remote_code=a.trust_remote_code)
    fmt = set_chat_format(tokenizer, format_options(a), source=a.tokenizer or "the embedded model")
    print(f"format: {fmt.description}")
    options = cache_options(a)
    if a.out and not a.out.endswith(".jsonl"):
        build_tokens(a.data, fmt, a.model_max_length, Path(a.out), options.num_workers())
        data = a.out
    else:
        data = a.data
    samples, report = load_tokens(data, fmt, a.model_max_length, options=options)
    if a.out and a.out.endswith(".jsonl"):
        with open(a.out, "w", encoding="utf-8") as f:
            for s in samples.select_columns(["id", "input_ids", "labels"]):
                f.write(json.dumps(s) + "\n")
    color = sys.stdout.isatty()
    for s in samples.select(range(min(a.show, len(samples)))):
        supervised = sum(label != IGNORE for label in s["labels"])
        print(f"--- {s['id']} ({len(s['input_ids'])} tokens, {supervised} supervised)")
        print(highlight(tokenizer, s["input_ids"], s["labels"], color))
    print(report.summary(a.data))
    if a.out:
        print(f"wrote {len(samples)} samples to {a.out}" + ("" if a.out.endswith(".jsonl") else
              f" (train from it with: qwen-tune sft --data_path {a.out} ...)"))
