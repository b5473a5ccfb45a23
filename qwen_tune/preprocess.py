"""`qwen-tune preprocess`: validate and tokenize data, write what the model will be trained on.

Renders with the chat template of `--tokenizer` (a checkpoint or tokenizer directory) or `--chat_template`,
as training would; writes one JSON object per kept sample (`id`, `input_ids`, `labels` with -100 for masked
positions) and prints the format used and a summary; `--show N` prints N samples with supervised spans marked.
"""

from __future__ import annotations

import argparse
import json
import sys

from .args import add_format_arguments, format_arguments
from .data.chat_format import IGNORE
from .data.dataset import load_sft_dataset
from .tokenizer import load_tokenizer

START, END = "\033[1;32m", "\033[0m"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-tune preprocess", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="a data file (.json, .jsonl, .parquet, ...; see the README), a directory, or a comma-separated list (weighted: a.jsonl:0.7,b.parquet:0.3)")
    p.add_argument("--tokenizer", default=None, help="a checkpoint or tokenizer directory; its tokenizer and chat template are used (unset: the embedded Qwen tokenizer, ChatML)")
    p.add_argument("--model_max_length", type=int, default=512, help="truncate longer samples (head kept; counted)")
    p.add_argument("--out", default=None, help="write the tokenized samples here as JSONL")
    p.add_argument("--show", type=int, default=0, help="print N samples with supervised spans highlighted")
    p.add_argument("--trust_remote_code", action="store_true", help="allow a checkpoint's own tokenizer code")
    add_format_arguments(p)
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
    tokenizer = load_tokenizer(a.tokenizer, trust_remote_code=a.trust_remote_code)
    fmt = format_arguments(a).chat_format(tokenizer, source=a.tokenizer or "the embedded tokenizer")
    print(f"format: {fmt.description}")
    samples, report = load_sft_dataset(a.data, fmt, a.model_max_length)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps({"id": s.id, "input_ids": s.input_ids, "labels": s.labels}) + "\n")
    color = sys.stdout.isatty()
    for s in samples[: a.show]:
        print(f"--- {s.id} ({len(s.input_ids)} tokens, {s.num_supervised} supervised)")
        print(highlight(tokenizer, s.input_ids, s.labels, color))
    print(report.summary(a.data))
    if a.out:
        print(f"wrote {len(samples)} samples to {a.out}")
