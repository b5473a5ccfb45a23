"""`qwen-tune score`: score preference pairs or conversations with a reward model, as JSON lines."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..data.chat_format import check_renderable
from ..options import FormatOptions, Method, load, set_chat_format
from ..options.groups import Frozen
from ..options.tools import TrustOptions, required
from ..rl.reward_models import last_reply_ids, load_reward_model, score_token_ids


@dataclass
class ScoreOptions(Frozen):
    _argument_group_name = "score"
    model: str | None = field(default=None, metadata={"help": "Reward model directory (full or LoRA adapter), e.g. the output of qwen-tune rm."})
    data: str | None = field(default=None, metadata={"help": "Preference pairs (prints accuracy) or SFT-style conversations (scores the last assistant turn)."})
    out: str | None = field(default=None, metadata={"help": "Where to write one JSON object per sample (.jsonl)."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per forward pass."})


# the format options' defaults: the reward model's saved template, as trained
METHOD = Method("score", groups={"score": ScoreOptions, "trust": TrustOptions, "format": FormatOptions},
                resolve=lambda values: required(values, "score", "model", "data", "out"))


def main(argv: list[str] | None = None) -> dict:
    from ..data.read import detect_kind, load_conversations, load_preference_pairs

    config = load(METHOD, argv)
    args = config.score
    kind = detect_kind(args.data)
    samples = load_preference_pairs(args.data) if kind == "preference" else load_conversations(args.data)  # validate first
    model, tokenizer = load_reward_model(args.model, trust_remote_code=config.trust.trust_remote_code)
    fmt = set_chat_format(tokenizer, config.format, source=args.model)
    check_renderable(fmt, samples)
    if kind == "preference":
        chosen = score_token_ids(model, [sum(fmt.reply_ids(s.prompt, s.chosen, s.tools), []) for s in samples], args.batch_size)
        rejected = score_token_ids(model, [sum(fmt.reply_ids(s.prompt, s.rejected, s.tools), []) for s in samples], args.batch_size)
        rows = [{"id": s.id, "chosen_score": c, "rejected_score": r} for s, c, r in zip(samples, chosen.tolist(), rejected.tolist())]
        summary = {"pairs": len(rows), "accuracy": (chosen > rejected).float().mean().item(),
                   "mean_margin": (chosen - rejected).mean().item()}
    else:
        scores = score_token_ids(model, [last_reply_ids(fmt, s.messages, s.tools) for s in samples], args.batch_size)
        rows = [{"id": s.id, "score": v} for s, v in zip(samples, scores.tolist())]
        summary = {"samples": len(rows), "mean_score": scores.mean().item()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(json.dumps({**summary, "out": args.out}))
    return summary
