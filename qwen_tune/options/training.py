"""The options of a training run: transformers' TrainingArguments with the seed's defaults and qwen-tune's own.

Parsing keeps them as values (the object itself sets up devices and process groups when built); `resolve()` decides
the dependent ones and `prepare_run()` builds the object the Trainer works with, once.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch
import transformers

# Learning rates that work when none is given: the seed's, and a large one for the tiny embedded model.
SEED_LR_FULL, SEED_LR_LORA, EMBEDDED_LR = 1e-5, 3e-4, 1e-2


def _default_report_to() -> str:
    return "tensorboard" if importlib.util.find_spec("tensorboard") else "none"


@dataclass
class RunArguments:
    """Options every method's run shares, declared once: the Trainer methods take them over transformers'
    TrainingArguments (below), ppo's own loop reads them itself."""

    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow writing over a finished run in output_dir."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "auto (the newest complete checkpoint in output_dir) or a checkpoint directory."}
    )
    keep_checkpoints: bool = field(
        default=False, metadata={"help": "Keep the checkpoint-N directories after a successful run (otherwise removed once the result is saved)."}
    )
    seed: int = field(default=42, metadata={"help": "Seed for data order, initialisation and sampling."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (Qwen's 0.95)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (global norm)."})
    deepspeed: str | None = field(
        default=None, metadata={"help": "DeepSpeed config (recipes/ds_config_zero2.json, ds_config_zero3.json); launch with torchrun."}
    )


@dataclass
class TrainingArguments(RunArguments, transformers.TrainingArguments):
    """transformers' TrainingArguments with the seed's defaults and a few qwen-tune options."""

    _argument_group_name = "training (transformers TrainingArguments; DeepSpeed, logging, checkpoints)"

    output_dir: str = field(default="output_qwen", metadata={"help": "Where checkpoints and the result go."})
    learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate (unset: the method's default for full or LoRA training, listed in the README; "
                                        f"{EMBEDDED_LR} on the embedded model)."},
    )
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (DeepSpeed configs never override it)."})
    warmup_ratio: float = field(default=0.01, metadata={"help": "Fraction of steps for linear warm-up."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Passes over the training data."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N optimizer steps."})
    save_strategy: str = field(default="steps", metadata={"help": "no, steps or epoch."})
    save_steps: float = field(default=1000, metadata={"help": "Save a checkpoint every N steps."})
    save_total_limit: int | None = field(default=10, metadata={"help": "Keep at most N checkpoints (the newest complete one is never deleted)."})
    report_to: None | str | list[str] = field(default_factory=_default_report_to, metadata={"help": "tensorboard (default when installed), none, wandb, ..."})
    include_num_input_tokens_seen: str = field(default="non_padding", metadata={"help": "Count real (non-pad) tokens for tokens/s."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep sample ids in batches (for error messages)."})
    train_sampling_strategy: str = field(
        default="auto",
        metadata={"help": "auto (group_by_length when sft's packing is off, else random), random, sequential, group_by_length, batch_rebalance.",
                  "choices": ["auto", "random", "sequential", "group_by_length", "batch_rebalance"]},
    )
    metric_for_best_model: str | None = field(
        default="loss", metadata={"help": "The evaluation metric that picks the best checkpoint: the run's summary names it and "
                                          "it is kept when the others are removed (loss: lower is better)."})
    max_bad_steps: int = field(default=0, metadata={"help": "Skip up to N steps with a non-finite loss/gradient instead of stopping."})
    # --save_total_limit, enforced by train/checkpoints.py on complete checkpoints; set by options.prepare_run
    checkpoint_limit: int | None = field(default=None, init=False)


def train_dtype(args) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
