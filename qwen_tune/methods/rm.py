"""Reward model training (`qwen-tune rm`): a Qwen backbone with a scalar head, Bradley-Terry loss.

Reads top to bottom like the job: validate and tokenize the pairs (before any model is loaded;
each side is scored at its closing `<|im_end|>`, see `ChatFormat.reply_ids`), load a standard
`AutoModelForSequenceClassification` (num_labels=1; full, LoRA with the head saved in the adapter,
or Q-LoRA), train with TRL's RewardTrainer (loss -log sigmoid(r_chosen - r_rejected - margin)),
report accuracy and mean margin, save a plain Hugging Face directory.

The two stages of Qwen's RLHF (preference-model pretraining, then fine-tuning on high-quality
comparisons) are two runs: the second one's `--model_name_or_path` is the first one's output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers import AutoModelForSequenceClassification, TrainerCallback
from trl import RewardConfig, RewardTrainer

from ..options import (DataOptions, FormatOptions, LearningRates, LoraOptions, Method, ModelOptions, TrainingArguments, load,
                      prepare_run, set_chat_format, train_dtype)
from ..errors import UserError
from ..models.lora import add_lora
from ..models.model import is_adapter, load_model, resolve_model_path
from ..data.pairs import encode_pairs
from ..data.splits import load_splits
from ..report import OwnModelCard, report_callbacks, show_progress_as_lines
from ..rl.reward_models import load_reward_model
from ..models.tokenizer import load_tokenizer
from ..train.distributed import log
from ..train.guards import ObservedSteps, safety_callbacks
from ..train.finish import finish_run, last_logged


@dataclass
class RewardTrainingArguments(TrainingArguments, RewardConfig):
    """Our training options (the seed's flags and defaults) plus TRL's reward options."""

    margin: float = field(default=0.0, metadata={"help": "Required reward gap: loss = -log sigmoid(r_chosen - r_rejected - margin)."})
    max_length: int | None = field(default=None, init=False)  # --model_max_length decides (longer pairs are dropped and named)
    trust_remote_code: bool = field(default=False, init=False)  # set from ModelArguments' --trust_remote_code


METHOD = Method(
    "rm",
    groups={"model": ModelOptions, "data": DataOptions, "format": FormatOptions, "lora": LoraOptions, "train": RewardTrainingArguments},
    learning_rates=LearningRates(full=1e-4, lora=1e-4),  # TRL's RewardConfig
)


class ObservedRewardTrainer(OwnModelCard, ObservedSteps, RewardTrainer):
    """TRL's RewardTrainer whose micro-batches the NaN guard (and tests) can see."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(ContinuedTokenCount(self))


class ContinuedTokenCount(TrainerCallback):
    """TRL's RewardTrainer counts the logged `num_tokens` in an attribute no checkpoint keeps, so a resumed run
    counted from 0 again; continue from the last value of the restored log."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        counted = [record["num_tokens"] for record in state.log_history if "num_tokens" in record]
        if counted:
            self.trainer._total_train_tokens = counted[-1]


def load_reward_backbone(model_options: ModelOptions, lora: LoraOptions, args: TrainingArguments):
    """(model, base path): from a base LM (new head), a full reward model, or a LoRA reward adapter (stage 2)."""
    start = model_options.model_name_or_path
    if is_adapter(start):
        if lora.q_lora:
            raise UserError(f"--model_name_or_path {start} is a LoRA adapter; merge it first (qwen-tune merge) to train Q-LoRA on it")
        model, _ = load_reward_model(start, is_trainable=lora.use_lora, dtype=train_dtype(args),
                                     trust_remote_code=model_options.trust_remote_code)
        base = model.peft_config["default"].base_model_name_or_path
        if not lora.use_lora:
            model = model.merge_and_unload()  # full fine-tuning of stage 1's merged reward model
        return model, base
    path = resolve_model_path(start)
    model = load_model(path, dtype=train_dtype(args), q_lora=lora.q_lora, trust_remote_code=model_options.trust_remote_code,
                       attn_implementation=model_options.attn_implementation, allow_pickle_weights=model_options.allow_pickle_weights,
                       model_class=AutoModelForSequenceClassification, num_labels=1)
    if lora.use_lora:
        # task_type SEQ_CLS makes PEFT train the new `score` head in full and save it with the adapter
        model = add_lora(model, q_lora=lora.q_lora, gradient_checkpointing=args.gradient_checkpointing,
                         task_type="SEQ_CLS", **lora.adapter_options())
    return model, path


def run(config, callbacks: tuple = ()) -> dict:
    """`callbacks`: extra Trainer callbacks (tests use them to trace batches and inject faults)."""
    prepared = prepare_run(config)  # also seeds the new score head
    args, model_options, data, lora = prepared.args, config.model, config.data, config.lora
    start = model_options.model_name_or_path
    tokenizer = load_tokenizer(start if start and os.path.isdir(start) else resolve_model_path(start),
                               trust_remote_code=model_options.trust_remote_code)
    fmt = set_chat_format(tokenizer, config.format, source=start or "the embedded model")
    log(f"format: {fmt.description}")
    train, train_report, evaluation, eval_report = load_splits(
        data, args.seed, lambda paths: encode_pairs(paths, fmt, data.model_max_length, args.margin, seed=args.seed), log)
    if not len(train):
        raise UserError(f"{data.data_path}: no pair fits within model_max_length={data.model_max_length}")

    model, base_path = load_reward_backbone(model_options, lora, args)
    model.config.use_cache = False
    if lora.use_lora:
        model.print_trainable_parameters()

    trainer = ObservedRewardTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        callbacks=safety_callbacks(args, callbacks, prepared.resume_from) + report_callbacks(args),
    )
    show_progress_as_lines(trainer)
    if lora.q_lora:  # TRL casts every trainable tensor of a 4-bit model to bf16; the score head must match the hidden states
        for name, param in model.named_parameters():
            if param.requires_grad and "modules_to_save" in name:
                param.data = param.data.to(train_dtype(args))
    result = trainer.train(resume_from_checkpoint=prepared.resume_from)
    metrics = dict(result.metrics)
    metrics["train_loss_final"] = last_logged(trainer, "loss")
    metrics["train_accuracy_first"] = next((h["accuracy"] for h in trainer.state.log_history if "accuracy" in h), None)  # stage 2: did it start from a working RM?
    metrics["train_accuracy_final"] = last_logged(trainer, "accuracy")
    if evaluation is not None:
        metrics.update(trainer.evaluate())  # eval_accuracy, eval_margin (mean r_chosen - r_rejected)
        log(f"eval: accuracy {metrics.get('eval_accuracy', float('nan')):.3f}, mean margin {metrics.get('eval_margin', float('nan')):.3f}")
    finish_run(trainer, tokenizer=tokenizer, fmt=fmt, data=data, data_reports={"train": train_report, "eval": eval_report},
               metrics=metrics, kind="rm", model_path=base_path, adapter=lora.use_lora, reward_model=True)
    return metrics


def main(argv: list[str] | None = None, callbacks: tuple = ()) -> dict:
    return run(load(METHOD, argv), callbacks=callbacks)
