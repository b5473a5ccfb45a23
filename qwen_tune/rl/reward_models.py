"""Reward models as a component: what gets scored, loading one (full or adapter), batched scoring.

The scoring contract: a reply is scored on its rendering by the run's chat template (the same
`ChatFormat` as SFT), read at the reply's closing `<|im_end|>`. Training (rm), scoring and PPO all
build their sequences with `ChatFormat.reply_ids`, so a reward means the same thing everywhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..data.chat_format import ChatFormat
from ..errors import UserError
from ..models.model import is_adapter
from ..trust import check_checkpoint

# ---------------------------------------------------------------- what is scored


def last_reply_ids(fmt: ChatFormat, messages: list[dict], tools: list | None = None) -> list[int]:
    """A conversation up to its last assistant turn, ending at that turn's `<|im_end|>` (SFT-style scoring)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    head, reply = fmt.reply_ids(messages[:last], messages[last : last + 1], tools)
    return head + reply


# ---------------------------------------------------------------- loading and scoring


def load_reward_model(path: str, *, is_trainable: bool = False, dtype: torch.dtype = torch.float32,
                      trust_remote_code: bool = False):
    """A reward model directory (full, or a LoRA adapter with its `score` head) -> (model, tokenizer).

    Loads with `AutoModelForSequenceClassification` / `AutoPeftModelForSequenceClassification`, the
    same classes anyone else would use; runs none of the checkpoint's code unless `trust_remote_code` (trust.py).
    """
    from transformers import AutoModelForSequenceClassification

    from ..models.tokenizer import load_tokenizer

    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"reward model {path}: no such directory")
    check_checkpoint(str(p), trust_remote_code=trust_remote_code)
    if is_adapter(p):
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(str(p), dtype=dtype, is_trainable=is_trainable, num_labels=1,
                                                                     trust_remote_code=trust_remote_code)
    elif (p / "config.json").exists():
        model = AutoModelForSequenceClassification.from_pretrained(str(p), dtype=dtype, num_labels=1,
                                                                   trust_remote_code=trust_remote_code)
        if "ForSequenceClassification" not in str((model.config.architectures or [""])[0]):
            print(f"warning: {path} is not a reward model (its score head is untrained)", file=sys.stderr)
    else:
        raise UserError(f"reward model {path}: neither config.json nor adapter_config.json found")
    tokenizer = load_tokenizer(str(p), trust_remote_code=trust_remote_code)
    config = model.config.get_text_config()
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    if not is_trainable:
        model.eval()
    return model, tokenizer


@torch.no_grad()
def score_token_ids(model, sequences: list[list[int]], batch_size: int = 16) -> torch.Tensor:
    """One scalar per token sequence, read at its last token (trailing pad tokens are not scored).

    Sequences are right-padded with the model's pad id; the sequence-classification head itself
    picks the last non-pad position. Returns a float32 CPU tensor of len(sequences).
    """
    pad = model.config.get_text_config().pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
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
    model.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0)


def reward_model_function(model, fmt: ChatFormat):
    """The reward model as a reward function in TRL's convention (for grpo): each conversational prompt plus its
    completion, rendered in the run's format, scored at the completion's `<|im_end|>`, as rm trained it."""

    def reward_model(prompts, completions, tools=None, **_):
        tools = tools or [None] * len(prompts)
        sequences = [last_reply_ids(fmt, list(p) + list(c), t) for p, c, t in zip(prompts, completions, tools)]
        return score_token_ids(model, sequences).tolist()

    return reward_model
