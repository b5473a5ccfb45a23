"""The options of `qwen-tune ppo` and the mistakes in them that are caught before anything runs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..options import RunArguments
from ..options.groups import Frozen
from ..rl.reward_functions import DEFAULT_TIMEOUT_S

# Defaults for the learning rate: usual RLHF values for real checkpoints; tiny models (like the
# embedded test model, ~10M parameters) need and tolerate a far larger step.
PPO_LR_FULL, PPO_LR_LORA, PPO_LR_TINY, TINY_MODEL_PARAMS = 1e-6, 1e-5, 3e-4, 100_000_000


@dataclass
class PPOArguments(RunArguments, Frozen):
    _argument_group_name = "ppo"
    policy: str | None = field(default=None, metadata={"help": "The SFT model to improve: a full model directory or a LoRA adapter (qwen-tune sft output)."})
    reward_model: str | None = field(default=None, metadata={"help": "Reward model directory (qwen-tune rm output: full or adapter)."})
    reward_fn: str | None = field(default=None, metadata={"help": "Instead of a reward model: module:function or path/file.py:function, called as f(prompt_messages, response_text) -> float."})
    reward_funcs: str | None = field(default=None, metadata={"help": "Comma-separated functions in TRL's convention, as grpo: f(prompts, completions, **columns) -> list[float | None]; summed, plus --reward_model's score if given."})
    reward_timeout: float = field(default=DEFAULT_TIMEOUT_S, metadata={"help": "Seconds one call of a reward function may take; a call that hangs stops the run with its name and prompts (0: no limit)."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "Weights of --reward_funcs, in order (unset: 1 each)."})
    prompts: str | None = field(default=None, metadata={"help": "Prompts: conversations ending with a user turn (any data file format, see data/prompts_example.jsonl)."})
    output_dir: str = field(default="output_qwen_ppo", metadata={"help": "Where the trained policy, ppo_log.jsonl and the report go."})
    save_steps: int = field(default=50, metadata={"help": "Save a resumable checkpoint every N PPO steps (0: none)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most N complete checkpoints."})
    max_prompt_length: int = field(default=1024, metadata={"help": "Prompts longer than this many tokens are skipped (and counted)."})
    # training, as in finetune.py
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the prompt set."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Prompts per rollout batch (one PPO step)."})
    mini_batch_size: int | None = field(default=None, metadata={"help": "Sequences per gradient step inside a PPO epoch (unset: the whole rollout batch)."})
    learning_rate: float | None = field(default=None, metadata={"help": f"AdamW learning rate, constant (unset: {PPO_LR_FULL} full, {PPO_LR_LORA} LoRA, {PPO_LR_TINY} for models under 100M parameters)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run a checkpoint's own Python code. Off unless you trust it."})
    # rollouts
    max_new_tokens: int = field(default=128, metadata={"help": "Longest reply sampled; replies stop earlier at <|im_end|>."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of rollouts (log-probabilities use the same one)."})
    missing_eos_penalty: float = field(default=0.0, metadata={"help": "Subtract this from the score of a reply cut off at max_new_tokens."})
    # PPO
    kl_coef: float = field(default=0.05, metadata={"help": "beta: weight of the per-token KL(actor || reference) penalty (initial value if adaptive)."})
    adaptive_kl: bool = field(default=False, metadata={"help": "Adapt kl_coef towards --target_kl (Ziegler et al. 2019)."})
    target_kl: float = field(default=6.0, metadata={"help": "Target KL per reply (nats) of the adaptive controller."})
    kl_horizon: int = field(default=10000, metadata={"help": "Horizon (in samples) of the adaptive KL controller."})
    kl_estimator: str = field(default="k1", metadata={"help": "Per-token KL estimate in the reward: k1 (log ratio), k2 or k3."})
    ppo_epochs: int = field(default=4, metadata={"help": "Passes of PPO updates over each rollout batch."})
    cliprange: float = field(default=0.2, metadata={"help": "Clip range of the policy ratio."})
    target_approx_kl: float = field(default=0.05, metadata={"help": "Stop a step's PPO updates once a minibatch's approximate KL to the rollout policy passes this."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value update."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Scale per-token rewards to unit variance per batch."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Normalise advantages to mean 0, variance 1 per batch."})
    critic: str = field(default="head", metadata={"help": "head: a linear value head on the policy's last hidden state; reward_model: a trainable copy of the reward model."})


def check_options(values: dict[str, dict]) -> None:
    """Mistakes users hit in the options, each a clear message before anything runs."""
    args = values["ppo"]
    for name in ("policy", "prompts"):
        if not args[name]:
            raise UserError(f"--{name} is required (see qwen-tune ppo --help)")
    if not (args["reward_model"] or args["reward_fn"] or args["reward_funcs"]):
        raise UserError("give --reward_model DIR, --reward_funcs module:function[,...] or --reward_fn module:function")
    if args["reward_fn"] and (args["reward_model"] or args["reward_funcs"]):
        raise UserError("--reward_fn (one reply at a time) cannot be combined; use --reward_funcs with --reward_model")
    if args["critic"] not in ("head", "reward_model"):
        raise UserError(f"--critic {args['critic']}: expected head or reward_model")
    if args["critic"] == "reward_model" and not args["reward_model"]:
        raise UserError("--critic reward_model needs --reward_model")
    if args["kl_estimator"] not in ("k1", "k2", "k3"):
        raise UserError(f"--kl_estimator {args['kl_estimator']}: expected k1, k2 or k3")
    if min(args["per_device_train_batch_size"], args["mini_batch_size"] or 1, args["max_new_tokens"], args["ppo_epochs"]) < 1:
        raise UserError("--per_device_train_batch_size, --mini_batch_size, --max_new_tokens and --ppo_epochs must be >= 1")
    if args["temperature"] <= 0:
        raise UserError("--temperature must be > 0 (PPO needs sampled replies)")


def check_paths(args: PPOArguments) -> None:
    """What the options name exists, and several ranks run under DeepSpeed."""
    if not args.deepspeed and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # else every rank would train alone
        raise UserError("ppo on several ranks runs under DeepSpeed: add --deepspeed recipes/ds_config_zero2.json "
                        "(or ds_config_zero3.json), or launch one process")
    if args.deepspeed and not Path(args.deepspeed).is_file():
        raise UserError(f"--deepspeed {args.deepspeed}: no such file")
    for name in ("policy", "reward_model"):
        path = getattr(args, name)
        if path and not Path(path).is_dir():
            raise UserError(f"--{name} {path}: no such directory")
