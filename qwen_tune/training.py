"""What every trainer shares: option checks before anything heavy loads, the dtype, reading the log, saying how to load."""

from __future__ import annotations

import importlib.util
import os

import torch
from transformers import Trainer

from .args import DataArguments, LoraArguments, ModelArguments, TrainingArguments
from .errors import UserError


def check_options(model_args: ModelArguments, data_args: DataArguments, lora_args: LoraArguments,
                  args: TrainingArguments) -> None:
    """Mistakes users hit, each a clear message before anything heavy is loaded."""
    if not data_args.data_path:
        raise UserError("--data_path is required (a .json/.jsonl file or directory; see data/ for examples)")
    if lora_args.q_lora and not lora_args.use_lora:
        raise UserError("--q_lora trains a LoRA adapter on a 4-bit base: add --use_lora True")
    if lora_args.q_lora and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--q_lora needs bitsandbytes: pip install bitsandbytes")
    if args.fp16 and not torch.cuda.is_available():
        raise UserError("--fp16 needs a CUDA GPU; on CPU train in fp32 (drop --fp16) or use --bf16 if your CPU supports it")
    if args.bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise UserError("--bf16: this GPU has no bfloat16 support; use --fp16 True instead")
    if args.train_sampling_strategy == "auto":
        args.train_sampling_strategy = "random"


def train_dtype(args: TrainingArguments) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def last_logged(trainer: Trainer, key: str):
    values = [h[key] for h in trainer.state.log_history if key in h]
    return values[-1] if values else None


def how_to_load(out: str, adapter: bool, reward_model: bool = False) -> str:
    """The lines printed at the end of a run: where the result is, the class that loads it, what to do next."""
    out = os.path.abspath(out)
    kind = "SequenceClassification" if reward_model else "CausalLM"
    cls, mod = (f"AutoPeftModelFor{kind}", "peft") if adapter else (f"AutoModelFor{kind}", "transformers")
    labels = ", num_labels=1" if reward_model else ""
    then = (f"Score data with:  qwen-tune score --model {out} --data PAIRS.jsonl --out scores.jsonl\n" if reward_model
            else f"Chat with it:  qwen-tune chat --model {out}\n")
    return (
        f"\nSaved {'the reward model ' if reward_model else ''}to {out}\n"
        f"Load it with:\n"
        f"  from {mod} import {cls}\n  from transformers import AutoTokenizer\n"
        f"  model = {cls}.from_pretrained({out!r}{labels})\n  tokenizer = AutoTokenizer.from_pretrained({out!r})\n"
        + then
    )
