"""`qwen-tune eval --model OUT --data FILE`: loss and perplexity over the supervised tokens, as JSON.

The same chat template, masking and loss as training (`loss.causal_lm_loss_sum`), so the number is
comparable with the eval_loss a run logged: the mean cross-entropy over every assistant token and its
closing `<|im_end|>`, over the whole file (not a mean of per-batch means).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ..options import CacheOptions, FormatOptions, ImageOptions, Method, load, set_chat_format
from ..options.groups import DEFAULT_MAX_LENGTH, Frozen
from ..options.tools import TrustOptions, required


def evaluate(model, fmt, data: str, *, model_max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 4, options=None) -> dict:
    """Loss over the supervised tokens of `data`, rendered in `fmt` (a `ChatFormat`); tokenized through the
    tokens cache (`options`: the --tokens_cache options), batches read from it memory-mapped."""
    import torch

    from ..data.collate import PaddedCollator
    from ..data.cache import load_tokens
    from ..errors import UserError
    from ..train.loss import causal_lm_loss_sum

    samples, report = load_tokens(data, fmt, model_max_length, options=options)
    if not samples:
        raise UserError(f"{data}: no sample has a supervised (assistant) token within model_max_length={model_max_length}")
    collate = PaddedCollator(fmt.tokenizer.pad_token_id, images=fmt.images)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            rows = samples[start : start + batch_size]
            batch = collate([{"input_ids": i, "labels": labels, "images": images}
                             for i, labels, images in zip(rows["input_ids"], rows["labels"], rows["images"])])
            loss_sum, n = causal_lm_loss_sum(model, batch)
            total, count = total + float(loss_sum), count + n
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "supervised_tokens": count, "samples": len(samples),
            "truncated": len(report.truncated), "dropped": len(report.dropped)}


@dataclass
class EvalOptions(Frozen):
    _argument_group_name = "eval"
    model: str | None = field(default=None, metadata={"help": "An output directory (full, merged or LoRA adapter) or a model (unset: the embedded model)."})
    data: str | None = field(default=None, metadata={"help": "Conversations: a data file (.json, .jsonl, .parquet, ...; see the README), a directory, or a comma-separated list."})
    model_max_length: int = field(default=DEFAULT_MAX_LENGTH, metadata={"help": "Truncate longer samples as training does (counted in the output)."})
    batch_size: int = field(default=4, metadata={"help": "Samples per forward pass."})


METHOD = Method("eval", groups={"eval": EvalOptions, "trust": TrustOptions, "format": FormatOptions, "images": ImageOptions,
                                "cache": CacheOptions},
                resolve=lambda values: required(values, "eval", "data"))


def main(argv: list[str] | None = None) -> dict:
    from ..data.image_inputs import image_inputs_for
    from ..data.read import check_conversations
    from .chat import load_for_inference

    config = load(METHOD, argv)
    a = config.eval
    check_conversations(a.data)  # bad data fails here, with file and line, before the model loads (streamed, nothing kept)
    model, tokenizer = load_for_inference(a.model, config.trust.trust_remote_code)
    images = image_inputs_for(a.model, tokenizer, config=model.config, min_pixels=config.images.min_pixels,
                              max_pixels=config.images.max_pixels) if a.model else None
    fmt = set_chat_format(tokenizer, config.format, source=a.model or "the embedded model", images=images)
    result = evaluate(model, fmt, a.data, model_max_length=a.model_max_length, batch_size=a.batch_size, options=config.cache)
    print(json.dumps(result))
    return result
