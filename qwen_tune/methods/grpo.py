"""Group Relative Policy Optimization (`qwen-tune grpo`) with verifiable rewards, on TRL's GRPOTrainer.

Reads top to bottom like the job: resolve the options, read and validate the prompts (file:line;
every other field of a record, such as `answer`, is kept for the reward functions), check that the
policy's saved chat template renders each prompt exactly as our served-format encoder does, load the
reward functions (TRL's convention, each checked) and an optional reward model, load the policy
(full, LoRA or Q-LoRA), train with GRPOTrainer (its loss variants, generation and DeepSpeed support;
every GRPOConfig option passes through under its TRL name) under the same safety callbacks as every
method, and finish like every method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig, GRPOTrainer

from ..options import (FormatOptions, LearningRates, LoraOptions, Method, TrainingArguments, load, prepare_run,
                      set_chat_format, train_dtype)
from ..options.groups import Frozen
from ..data.read import load_prompts
from ..errors import UserError
from ..models.lora import describe_adapter, lora_config
from ..models.model import is_adapter, load_model, resolve_model_path
from ..report import OwnModelCard, report_callbacks, show_progress_as_lines
from ..rl.reward_functions import DEFAULT_TIMEOUT_S, load_batch_rewards
from ..models.tokenizer import load_tokenizer
from ..train.distributed import log, print_zero3_partition
from ..train.guards import ObservedSteps, safety_callbacks
from ..train.finish import finish_run, last_logged


@dataclass
class GRPOInputs(Frozen):
    _argument_group_name = "grpo"
    policy: str | None = field(default=None, metadata={"help": "The SFT model to improve: a model directory (qwen-tune sft output) or hub id."})
    prompts: str | None = field(default=None, metadata={"help": "Prompts ending with a user turn (any data file format, see data/grpo_example.jsonl); other fields (e.g. answer) reach the reward functions."})
    reward_funcs: str | None = field(default=None, metadata={"help": "Comma-separated module:function or file.py:function, called as f(prompts, completions, **columns) -> list[float | None] (TRL's convention)."})
    reward_timeout: float = field(default=DEFAULT_TIMEOUT_S, metadata={"help": "Seconds one call of a reward function may take; a call that hangs stops the run with its name and prompts (0: no limit)."})
    reward_model: str | None = field(default=None, metadata={"help": "A reward model directory (qwen-tune rm output) scoring each completion, as one more reward."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run a checkpoint's own Python code. Off unless you trust it."})


@dataclass
class GRPOTrainingArguments(TrainingArguments, GRPOConfig):
    """Our training options plus TRL's GRPO options (--num_generations, --beta, --loss_type, --temperature, ...)."""

    output_dir: str = field(default="output_qwen_grpo", metadata={"help": "Where checkpoints and the trained policy go."})
    beta: float = field(default=0.04, metadata={"help": "KL weight towards the starting policy. TRL's default 0 let the embedded model drift into degenerate text once every group's rewards were equal; 0.04 held."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the prompts."})
    include_num_input_tokens_seen: str = field(default="no", metadata={"help": "GRPO batches are generated, not tokenized data."})
    trust_remote_code: bool = field(default=False, init=False)  # set from --trust_remote_code
    chat_template_kwargs: dict | None = field(default=None, init=False)  # set from the format's --enable_thinking / --chat_template_kwargs


def check_inputs(values: dict[str, dict]) -> None:
    if not values["grpo"]["policy"]:
        raise UserError("--policy is required: the SFT model to improve (see qwen-tune grpo --help)")


METHOD = Method(
    "grpo",
    groups={"grpo": GRPOInputs, "format": FormatOptions, "lora": LoraOptions, "train": GRPOTrainingArguments},
    learning_rates=LearningRates(full=1e-6, lora=1e-5),  # TRL's GRPOConfig; an adapter's update is scaled down by alpha / r
    model_option=("grpo", "policy"),
    resolve=check_inputs,
)


class ObservedGRPOTrainer(OwnModelCard, ObservedSteps, GRPOTrainer):
    """TRL's GRPOTrainer whose micro-batches the NaN guard (and tests) can see."""


def rendered_as_served(fmt, conversations) -> list[list[dict]]:
    """The prompts as TRL will render them (the template's own `apply_chat_template`), checked token for token
    against our encoder, which keeps control tokens typed into text as text: any difference is an error."""
    prompts = []
    for c in conversations:
        if c.tools:
            raise UserError(f"{c.source}: grpo cannot give per-prompt tools to the policy yet; remove \"tools\"")
        messages = fmt.messages_for(c.messages)
        theirs = fmt.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, **fmt.template_kwargs)["input_ids"]
        if list(theirs) != fmt.prompt_ids(c.messages):
            raise UserError(f"{c.source}: the chat template would read text in this prompt as control tokens "
                            f"(e.g. a typed <|im_end|>); remove them")
        prompts.append(messages)
    return prompts


def prompt_dataset(conversations, prompts):
    """Rows of {prompt, id, *columns}; a column missing from some records would reach a reward function as None."""
    from datasets import Dataset

    names = sorted({k for c in conversations for k in c.columns})
    for c in conversations:
        missing = [n for n in names if n not in c.columns]
        if missing:
            raise UserError(f"{c.source}: has no {', '.join(missing)} (other prompts have them); give every prompt the same fields")
    return Dataset.from_list([{"prompt": p, "id": c.id, **c.columns} for c, p in zip(conversations, prompts)])


def load_rewards(inputs: GRPOInputs, fmt) -> list:
    rewards = load_batch_rewards(inputs.reward_funcs or "", inputs.reward_timeout or None)
    if inputs.reward_model:
        from ..rl.reward_models import load_reward_model, reward_model_function

        model, _ = load_reward_model(inputs.reward_model, trust_remote_code=inputs.trust_remote_code)
        rewards.append(reward_model_function(model.eval().requires_grad_(False), fmt))
    if not rewards:
        raise UserError("give --reward_funcs module:function[,...] and/or --reward_model DIR")
    return rewards


def run(config, callbacks: tuple = ()) -> dict:
    """`callbacks`: extra Trainer callbacks (tests use them to trace batches and inject faults)."""
    prepared = prepare_run(config)
    args, inputs, lora = prepared.args, config.grpo, config.lora
    if is_adapter(inputs.policy):
        raise UserError(f"--policy {inputs.policy} is a LoRA adapter; merge it first (qwen-tune merge), then train "
                        f"the merged model (add --use_lora True for a new adapter)")
    policy_path = resolve_model_path(inputs.policy)

    tokenizer = load_tokenizer(policy_path, trust_remote_code=inputs.trust_remote_code)
    fmt = set_chat_format(tokenizer, config.format, source=policy_path)  # the policy's saved template: the format it was trained in
    log(f"format: {fmt.description}")
    conversations = load_prompts(inputs.prompts, seed=args.seed, log=log)
    train = prompt_dataset(conversations, rendered_as_served(fmt, conversations))
    rewards = load_rewards(inputs, fmt)
    log(f"grpo: {len(train)} prompts x {args.num_generations} completions, rewards: "
        + ", ".join(r.__name__ for r in rewards))

    model = load_model(policy_path, dtype=train_dtype(args), q_lora=lora.q_lora, trust_remote_code=inputs.trust_remote_code)
    print_zero3_partition(model)
    trainer = ObservedGRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=lora_config(model, **lora.adapter_options()) if lora.use_lora else None,
        callbacks=safety_callbacks(args, callbacks, prepared.resume_from) + report_callbacks(args, log="grpo_log.jsonl"),
    )
    if lora.use_lora:
        log(f"lora: adapting {describe_adapter(trainer.model)}")
    show_progress_as_lines(trainer)
    result = trainer.train(resume_from_checkpoint=prepared.resume_from)
    metrics = dict(result.metrics)
    metrics["reward_first"] = next((h["reward"] for h in trainer.state.log_history if "reward" in h), None)
    metrics["reward_final"] = last_logged(trainer, "reward")
    finish_run(trainer, tokenizer=tokenizer, fmt=fmt, data=PromptData(inputs.prompts), data_reports={}, metrics=metrics,
               kind="grpo", model_path=policy_path, adapter=lora.use_lora)
    return metrics


@dataclass(frozen=True)
class PromptData:
    """Where the prompts came from, as the model card lists data."""

    data_path: str
    eval_data_path: None = None


def main(argv: list[str] | None = None, callbacks: tuple = ()) -> dict:
    return run(load(METHOD, argv), callbacks=callbacks)
