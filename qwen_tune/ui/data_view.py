"""The page's data view: a data set checked and tokenized as `qwen-tune preprocess` and `sft` do (same code, same
errors with file:line), each conversation as (text, supervised) spans in the checkpoint's served format (or the
`--chat_template` a run will train with)."""

from __future__ import annotations

import os
import threading

from ..errors import UserError
from ..options import FormatOptions, set_chat_format
from .roots import Roots

_tokenizers: dict[str, object] = {}  # model path -> its tokenizer, loaded once
_loading = threading.Lock()


def preview(roots: Roots, body: dict) -> dict:
    from ..data.cache import load_tokens
    from ..data.image_inputs import image_inputs_for
    from ..models.model import resolve_model_path
    from ..tools.preprocess import supervised_spans

    if not (body.get("data") or "").strip():
        raise UserError("name a data file (or several, comma-separated)")
    data = roots.data(body["data"], "data")
    model = roots.model(body["model"], "model") if (body.get("model") or "").strip() else None
    template = (body.get("chat_template") or "").strip() or None
    if template and (os.sep in template or template.endswith(".jinja")):
        template = roots.path(template, "chat template")
    max_length, limit = int(body.get("max_length") or 1024), min(int(body.get("limit") or 20), 200)
    if max_length < 8:
        raise UserError("max length: at least 8 tokens")
    source = resolve_model_path(model)
    with _loading:
        tokenizer = _tokenizer(source)
        images = image_inputs_for(source, tokenizer)
        fmt = set_chat_format(tokenizer, FormatOptions(chat_template=template), source=model or "the embedded model",
                              images=images)
        samples, report = load_tokens(data, fmt, max_length)
    truncated = set(report.truncated)
    shown = samples.select(range(min(limit, len(samples))))
    return {"ok": True, "format": fmt.description, "summary": report.summary(body["data"]), "total": len(samples),
            "samples": [{"id": s["id"], "tokens": len(s["input_ids"]), "truncated": s["id"] in truncated,
                         "supervised": sum(label != -100 for label in s["labels"]),
                         "spans": supervised_spans(tokenizer, s["input_ids"], s["labels"], s["images"],
                                                   images and images.image_token_id)}
                        for s in shown]}


def _tokenizer(source: str):
    from ..models.tokenizer import load_tokenizer

    if source not in _tokenizers:
        _tokenizers[source] = load_tokenizer(source)
    return _tokenizers[source]
