"""Reward models: loading one (full or adapter) and scoring token sequences.

Minimal version written for PPO; the reward-model issue owns this file (and `qwen-tune score`).
The contract: one scalar per sequence, read at its last token (the closing `<|im_end|>` of the
ChatML-rendered prompt + response).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError


def load_reward_model(path: str, dtype: torch.dtype = torch.float32):
    """A reward model directory -> (model, tokenizer): `AutoModelForSequenceClassification` (num_labels=1)
    or a PEFT adapter of one. Never runs remote code."""
    from transformers import AutoModelForSequenceClassification

    from .tokenizer import load_tokenizer

    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"reward model {path}: no such directory")
    if (p / "adapter_config.json").exists() and not (p / "config.json").exists():
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(str(p), dtype=dtype, num_labels=1)
    elif (p / "config.json").exists():
        model = AutoModelForSequenceClassification.from_pretrained(str(p), dtype=dtype, num_labels=1)
    else:
        raise UserError(f"reward model {path}: neither config.json nor adapter_config.json found")
    tokenizer = load_tokenizer(str(p))
    config = model.config.get_text_config()
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


@torch.no_grad()
def score_token_ids(model, sequences: list[list[int]], batch_size: int = 16) -> torch.Tensor:
    """One float32 score per token sequence, read at its last token (right padding is never scored)."""
    pad = model.config.get_text_config().pad_token_id
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        width = max(len(s) for s in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, s in enumerate(batch):
            input_ids[i, : len(s)] = torch.as_tensor(s)
            attention_mask[i, : len(s)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        scores.append(logits[:, 0].float().cpu())
    return torch.cat(scores) if scores else torch.zeros(0)
