"""`qwen-tune score`: score preference pairs or conversations with a reward model, as JSON lines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data.chat_format import check_renderable
from ..rl.reward_models import last_reply_ids, load_reward_model, score_token_ids


def parse_args(argv: list[str] | None):
    from ..options.tools import add_format_arguments, add_trust_argument

    p = argparse.ArgumentParser(prog="qwen-tune score", description="Score preference pairs or conversations with a reward model.")
    p.add_argument("--model", required=True, help="Reward model directory (full or LoRA adapter), e.g. the output of qwen-tune rm.")
    p.add_argument("--data", required=True, help="Preference pairs (prints accuracy) or SFT-style conversations (scores the last assistant turn).")
    p.add_argument("--out", required=True, help="Where to write one JSON object per sample (.jsonl).")
    p.add_argument("--batch_size", type=int, default=16, help="Sequences per forward pass.")
    add_trust_argument(p)
    add_format_arguments(p)  # defaults: the reward model's saved template, as trained
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from ..options.groups import set_chat_format
    from ..options.tools import format_options
    from ..data.read import detect_kind, load_conversations, load_preference_pairs

    args = parse_args(argv)
    kind = detect_kind(args.data)
    samples = load_preference_pairs(args.data) if kind == "preference" else load_conversations(args.data)  # validate first
    model, tokenizer = load_reward_model(args.model, trust_remote_code=args.trust_remote_code)
    fmt = set_chat_format(tokenizer, format_options(args), source=args.model)
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
