"""Direct Preference Optimization (`qwen-tune dpo`): the lighter alternative to reward model + PPO.

Reads top to bottom like the job: validate and tokenize the pairs in the run's chat template (prompt =
the rendered conversation up to the reply's body, completion = the reply through its `<|im_end|>`, exactly
the tokens SFT supervises), load the policy (full or LoRA), train with TRL's DPOTrainer, save a
plain Hugging Face directory. The reference is a frozen copy of the start model, or with LoRA the
same model with the adapter disabled (no second copy in memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import set_seed
from trl import DPOConfig, DPOTrainer

from .args import DataArguments, LoraArguments, ModelArguments, TrainingArguments, parse, resolve_options, train_dtype
from .errors import UserError
from .model import load_model, lora_config, resolve_model_path
from .data.pairs import encode_pairs
from .report import report_callbacks
from .tokenizer import load_tokenizer
from .train.distributed import log
from .train.guards import ObservedSteps, safety_callbacks
from .train.outputs import finish_run, last_logged


@dataclass
class DPOTrainingArguments(TrainingArguments, DPOConfig):
    """Our training options (the seed's flags and defaults) plus TRL's DPO options (--beta, --loss_type, ...)."""

    beta: float = field(default=0.1, metadata={"help": "Strength of the pull towards the reference model (higher = stay closer)."})
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"], metadata={"help": "sigmoid (DPO), ipo, hinge, robust, ... (TRL's names)."})
    max_length: int | None = field(default=None, init=False)  # --model_max_length decides (longer pairs are dropped and named)
    trust_remote_code: bool = field(default=False, init=False)  # set from ModelArguments' --trust_remote_code


ARGUMENTS = (ModelArguments, DataArguments, LoraArguments, DPOTrainingArguments)


class PretokenizedDPOTrainer(ObservedSteps, DPOTrainer):
    """DPOTrainer fed our own tokens: the data is already prompt_ids/chosen_ids/rejected_ids.

    TRL 1.16 has no public switch for pre-tokenized DPO data (RewardTrainer has one), so this is the
    one private override left; tests/test_dpo.py checks that the trained tokens are ours."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # TRL would re-tokenize; ours are the served-format tokens SFT trains on


def run(model_args: ModelArguments, data_args: DataArguments, lora_args: LoraArguments, args: DPOTrainingArguments,
        callbacks: tuple = ()) -> dict:
    """`callbacks`: extra Trainer callbacks (tests use them to trace batches and inject faults)."""
    resolve_options(model_args, data_args, lora_args, args)
    model_path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = load_tokenizer(model_path, trust_remote_code=model_args.trust_remote_code)
    fmt = data_args.chat_format(tokenizer, source=model_path)
    log(f"format: {fmt.description}")
    train, train_report = encode_pairs(data_args.data_path, fmt, args.model_max_length, split_prompt=True)
    log(train_report.summary("train"))
    evaluation, eval_report = None, None
    if data_args.eval_data_path:
        evaluation, eval_report = encode_pairs(data_args.eval_data_path, fmt, args.model_max_length, split_prompt=True)
        log(eval_report.summary("eval"))
    if not len(train):
        raise UserError(f"{data_args.data_path}: no pair fits within model_max_length={args.model_max_length}")

    set_seed(args.seed)
    model = load_model(model_path, dtype=train_dtype(args), q_lora=lora_args.q_lora, trust_remote_code=model_args.trust_remote_code,
                       attn_implementation=model_args.attn_implementation)
    model.config.use_cache = False
    trainer = PretokenizedDPOTrainer(
        model=model,
        ref_model=None,  # full: TRL loads a frozen copy of model_path; LoRA: the adapter is disabled instead
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=lora_config(**lora_args.adapter_options()) if lora_args.use_lora else None,
        callbacks=safety_callbacks(args, callbacks) + report_callbacks(args),
    )
    if lora_args.use_lora:
        trainer.model.print_trainable_parameters()
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics = dict(result.metrics)
    metrics["train_loss_final"] = last_logged(trainer, "loss")
    if evaluation is not None:
        metrics.update(trainer.evaluate())  # eval_rewards/margins, eval_rewards/accuracies, ...

    if evaluation is not None:
        log(f"eval: preference accuracy {metrics.get('eval_rewards/accuracies', float('nan')):.3f}, "
            f"reward margin {metrics.get('eval_rewards/margins', float('nan')):.3f}")
    finish_run(trainer, tokenizer=tokenizer, fmt=fmt, data_args=data_args, data_reports={"train": train_report, "eval": eval_report},
               metrics=metrics, kind="dpo", model_path=model_path, adapter=lora_args.use_lora)
    return metrics


def main(argv: list[str] | None = None, callbacks: tuple = ()) -> dict:
    return run(*parse(ARGUMENTS, argv, prog="qwen-tune dpo"), callbacks=callbacks)
