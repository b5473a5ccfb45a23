"""`qwen-tune preprocess`: validate and tokenize data, write what the model will be trained on.

Renders with the chat template of `--tokenizer` (a checkpoint or tokenizer directory) or `--chat_template`,
as training would, and prints the format used and a summary; `--show N` prints N samples with supervised spans
marked. `--out DIR` writes the tokenized data as a memory-mapped tokens directory (data/cache.py) that
`sft --data_path DIR` trains from; `--out FILE.jsonl` writes one JSON object per kept sample (`id`, `input_ids`,
`labels` with -100 for masked positions).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..options import CacheOptions, FormatOptions, ImageOptions, Method, load, set_chat_format
from ..options.groups import DEFAULT_MAX_LENGTH, Frozen
from ..options.tools import TrustOptions, required
from ..data.chat_format import IGNORE
from ..data.cache import build_tokens, load_tokens
from ..data.image_inputs import image_inputs_for
from ..models.tokenizer import load_tokenizer

START, END = "\033[1;32m", "\033[0m"


@dataclass
class PreprocessOptions(Frozen):
    _argument_group_name = "preprocess"
    data: str | None = field(default=None, metadata={"help": "A data file (.json, .jsonl, .parquet, ...; see the README), a directory, a dataset in the local Hugging Face cache (org/name[:config][:split]), or a comma-separated list (weighted: a.jsonl:0.7,b.parquet:0.3)."})
    tokenizer: str | None = field(default=None, metadata={"help": "A checkpoint or tokenizer directory; its tokenizer and chat template are used (unset: the embedded Qwen tokenizer, ChatML)."})
    model_max_length: int = field(default=DEFAULT_MAX_LENGTH, metadata={"help": "Truncate longer samples (head kept; counted)."})
    out: str | None = field(default=None, metadata={"help": "A directory: write the tokens there for sft --data_path DIR (--tokens_cache is then not used); a .jsonl file: the kept samples as JSON lines."})
    show: int = field(default=0, metadata={"help": "Print N samples with supervised spans highlighted."})


METHOD = Method("preprocess", groups={"preprocess": PreprocessOptions, "trust": TrustOptions, "format": FormatOptions,
                                      "images": ImageOptions, "cache": CacheOptions},
                resolve=lambda values: required(values, "preprocess", "data"))


def supervised_spans(tokenizer, input_ids: list[int], labels: list[int], images: list[str] = (),
                     image_token_id: int | None = None) -> list[tuple[str, bool]]:
    """A sample decoded as (text, supervised) spans; each image's run of tokens is one span,
    `<|image_pad|> x N (PATH)`. The page (qwen-tune ui) shows these too."""
    spans, span, supervised, pictures = [], [], None, iter(images)
    for tok, label in zip(input_ids + [None], labels + [None]):
        is_sup = label is not None and label != IGNORE
        if tok is None or (supervised is not None and is_sup != supervised) or (span and (tok == image_token_id) != (span[-1] == image_token_id)):
            if span and span[0] == image_token_id:
                text = f"{tokenizer.convert_ids_to_tokens(image_token_id)} x {len(span)} ({next(pictures, '?')})"
            else:
                text = tokenizer.decode(span)
            spans.append((text, bool(supervised)))
            span = []
        if tok is not None:
            span.append(tok)
            supervised = is_sup
    return spans


def highlight(tokenizer, input_ids: list[int], labels: list[int], color: bool, images: list[str] = (),
              image_token_id: int | None = None) -> str:
    """A sample decoded, supervised spans marked with [[...]] (or green when printing to a terminal)."""
    start, end = (START, END) if color else ("[[", "]]")
    return "".join(f"{start}{text}{end}" if supervised else text
                   for text, supervised in supervised_spans(tokenizer, input_ids, labels, images, image_token_id))


def main(argv: list[str] | None = None) -> None:
    from ..models.model import resolve_model_path

    config = load(METHOD, argv)
    a, options = config.preprocess, config.cache
    source = resolve_model_path(a.tokenizer)  # unset: the embedded model's, so `sft --data_path OUT` on it matches
    tokenizer = load_tokenizer(source, trust_remote_code=config.trust.trust_remote_code)
    images = image_inputs_for(source, tokenizer, min_pixels=config.images.min_pixels, max_pixels=config.images.max_pixels)
    fmt = set_chat_format(tokenizer, config.format, source=a.tokenizer or "the embedded model", images=images)
    print(f"format: {fmt.description}")
    if a.out and not a.out.endswith(".jsonl"):
        build_tokens(a.data, fmt, a.model_max_length, Path(a.out), options.num_workers())
        data = a.out
    else:
        data = a.data
    samples, report = load_tokens(data, fmt, a.model_max_length, options=options)
    if a.out and a.out.endswith(".jsonl"):
        with open(a.out, "w", encoding="utf-8") as f:
            for s in samples.select_columns(["id", "input_ids", "labels", "images"]):
                f.write(json.dumps(s) + "\n")
    color = sys.stdout.isatty()
    for s in samples.select(range(min(a.show, len(samples)))):
        supervised = sum(label != IGNORE for label in s["labels"])
        print(f"--- {s['id']} ({len(s['input_ids'])} tokens, {supervised} supervised)")
        print(highlight(tokenizer, s["input_ids"], s["labels"], color, s["images"], images and images.image_token_id))
    print(report.summary(a.data))
    if a.out:
        print(f"wrote {len(samples)} samples to {a.out}" + ("" if a.out.endswith(".jsonl") else
              f" (train from it with: qwen-tune sft --data_path {a.out} ...)"))
