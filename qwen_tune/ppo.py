"""RLHF stage 2: PPO on an SFT policy against a reward model or a reward function.

Our own implementation (TRL removed its PPOTrainer). Reads top to bottom like the algorithm:
for each batch of prompts, sample replies (prompts rendered by the policy's chat template) from the actor (stopping at `<|im_end|>`),
score them, compute per-token rewards (-kl_coef * KL(actor || reference) + the score on the
last token), values and GAE advantages, then run several epochs of clipped PPO updates over
minibatches. The formulas live in `ppo_math.py`.

Models: actor = the policy (all weights, or a LoRA adapter); reference = the frozen initial
policy (with LoRA, the same weights with the adapter switched off - no second copy); critic =
a linear value head on the actor's last hidden state (default) or a trainable copy of the
reward model; the reward model is frozen.

Under `--deepspeed` (launched with torchrun / deepspeed, N ranks): actor + critic are wrapped by
`deepspeed.initialize` (ZeRO stage 0-3), every rank samples and scores its share of each rollout
batch (per_device_train_batch_size prompts), DeepSpeed averages the gradients, the reference and
reward models are frozen replicas on every rank, and rank 0 logs metrics averaged over ranks and
saves the policy exactly as a single process would. Under ZeRO-3 the weights are sharded: ranks
generate in lockstep (`synced_gpus`) and gather the full weights to save.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .args import FormatArguments, LoraArguments, parse
from .chat_format import check_renderable
from .checkpointing import prepare_output_dir
from .data import load_prompts
from .distributed import log, print_zero3_partition
from .errors import UserError
from .loss import _backbone_and_head
from .model import add_lora, is_adapter, load_model
from .ppo_math import (
    AdaptiveKLController,
    entropy_from_logits,
    gae,
    kl_estimate,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from .report import write_run_report
from .tokenizer import ENDOFTEXT, IM_END, load_tokenizer
from .training import how_to_load

# Defaults for the learning rate: usual RLHF values for real checkpoints; tiny models (like the
# embedded test model, ~10M parameters) need and tolerate a far larger step.
PPO_LR_FULL, PPO_LR_LORA, PPO_LR_TINY, TINY_MODEL_PARAMS = 1e-6, 1e-5, 1e-3, 100_000_000


@dataclass
class PPOArguments(FormatArguments):
    policy: str | None = field(default=None, metadata={"help": "The SFT model to improve: a full model directory or a LoRA adapter (qwen-tune sft output)."})
    reward_model: str | None = field(default=None, metadata={"help": "Reward model directory (qwen-tune rm output: full or adapter)."})
    reward_fn: str | None = field(default=None, metadata={"help": "Instead of a reward model: module:function or path/file.py:function, called as f(prompt_messages, response_text) -> float."})
    prompts: str | None = field(default=None, metadata={"help": "Prompts: conversations ending with a user turn (.json/.jsonl, see data/prompts_example.jsonl)."})
    output_dir: str = field(default="output_qwen_ppo", metadata={"help": "Where the trained policy, ppo_log.jsonl and the report go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow writing over a finished run in output_dir."})
    max_prompt_length: int = field(default=1024, metadata={"help": "Prompts longer than this many tokens are skipped (and counted)."})
    # training, as in finetune.py
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the prompt set."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Prompts per rollout batch (one PPO step)."})
    mini_batch_size: int | None = field(default=None, metadata={"help": "Sequences per gradient step inside a PPO epoch (default: the whole rollout batch)."})
    learning_rate: float | None = field(default=None, metadata={"help": f"AdamW learning rate, constant (default {PPO_LR_FULL} full, {PPO_LR_LORA} LoRA, {PPO_LR_TINY} for models under 100M parameters)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (Qwen's 0.95)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    seed: int = field(default=42, metadata={"help": "Seed for sampling, shuffling and the value head."})
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed config (e.g. recipes/ds_config_zero2.json or ds_config_zero3.json); launch with torchrun --nproc_per_node N. \"auto\" values are filled in."})
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
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value update."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Scale per-token rewards to unit variance per batch."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Normalise advantages to mean 0, variance 1 per batch."})
    critic: str = field(default="head", metadata={"help": "head: a linear value head on the policy's last hidden state; reward_model: a trainable copy of the reward model."})


# ---------------------------------------------------------------- options, prompts, rewards


def check_options(args: PPOArguments, lora: LoraArguments) -> None:
    """Mistakes users hit, each a clear message before anything heavy is loaded."""
    for name in ("policy", "prompts"):
        if not getattr(args, name):
            raise UserError(f"--{name} is required (see qwen-tune ppo --help)")
    if bool(args.reward_model) == bool(args.reward_fn):
        raise UserError("give exactly one of --reward_model DIR or --reward_fn module:function")
    if args.critic not in ("head", "reward_model"):
        raise UserError(f"--critic {args.critic}: expected head or reward_model")
    if args.critic == "reward_model" and not args.reward_model:
        raise UserError("--critic reward_model needs --reward_model")
    if args.kl_estimator not in ("k1", "k2", "k3"):
        raise UserError(f"--kl_estimator {args.kl_estimator}: expected k1, k2 or k3")
    if args.deepspeed and not Path(args.deepspeed).is_file():
        raise UserError(f"--deepspeed {args.deepspeed}: no such file")
    if args.per_device_train_batch_size < 1 or (args.mini_batch_size or 1) < 1 or args.max_new_tokens < 1 or args.ppo_epochs < 1:
        raise UserError("--per_device_train_batch_size, --mini_batch_size, --max_new_tokens and --ppo_epochs must be >= 1")
    if args.temperature <= 0:
        raise UserError("--temperature must be > 0 (PPO needs sampled replies)")
    if lora.q_lora and not lora.use_lora:
        raise UserError("--q_lora trains a LoRA adapter on a 4-bit base: add --use_lora True")
    for name in ("policy", "reward_model"):
        path = getattr(args, name)
        if path and not Path(path).is_dir():
            raise UserError(f"--{name} {path}: no such directory")


def load_reward_fn(spec: str):
    """`module:function` or `path/to/file.py:function` -> the callable."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise UserError(f"--reward_fn {spec}: expected module:function or file.py:function")
    try:
        if target.endswith(".py"):
            if not Path(target).is_file():
                raise UserError(f"--reward_fn {spec}: no such file {target}")
            module_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as e:
        raise UserError(f"--reward_fn {spec}: cannot import {target}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"--reward_fn {spec}: {target} has no function {name}")
    return fn


def call_reward_fn(fn, spec: str, prompt_id: str, messages: list[dict], text: str) -> float:
    value = fn(messages, text)
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = float("nan")
    if not math.isfinite(value):
        raise UserError(f"--reward_fn {spec} returned {value!r} for prompt {prompt_id}; it must return a finite number")
    return value


# ---------------------------------------------------------------- models


def load_actor(policy: str, lora: LoraArguments, trust_remote_code: bool, device: torch.device):
    """-> (actor, reference context). The reference is the frozen starting policy:
    LoRA on a full model: the adapter switched off; an SFT adapter trained further: a frozen copy
    of that adapter (PEFT multi-adapter); full training: a second, frozen model."""
    if is_adapter(policy):
        from peft import AutoPeftModelForCausalLM

        actor = to_device(AutoPeftModelForCausalLM.from_pretrained(policy, is_trainable=lora.use_lora), device)
        if lora.use_lora:  # keep training the SFT adapter; its starting point is the reference
            actor.load_adapter(policy, adapter_name="reference", is_trainable=False)
            actor.set_adapter("default")
            return actor, _switch_adapter(actor)
        actor = actor.merge_and_unload()  # full training of the merged SFT policy
    else:
        actor = to_device(load_model(policy, q_lora=lora.q_lora, trust_remote_code=trust_remote_code), device)
        if lora.use_lora:
            actor = add_lora(actor, q_lora=lora.q_lora, **lora.adapter_options())
            return actor, _adapter_off(actor)
    reference = copy.deepcopy(actor).eval().requires_grad_(False)
    return actor, lambda: contextlib.nullcontext(reference)


def _adapter_off(actor):
    @contextlib.contextmanager
    def use_reference():
        with actor.disable_adapter():
            yield actor
    return use_reference


def _switch_adapter(actor):
    @contextlib.contextmanager
    def use_reference():
        actor.set_adapter("reference")
        try:
            yield actor
        finally:
            actor.set_adapter("default")  # also makes only "default" trainable again
    return use_reference


class ValueHead(torch.nn.Module):
    """V(s_t) from the policy's last hidden state; starts at 0 so early advantages are the rewards."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.summary.weight)
        torch.nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor, **_) -> torch.Tensor:
        return self.summary(hidden.float()).squeeze(-1)


class RewardModelCritic(torch.nn.Module):
    """V(s_t) = the reward model's score head read at every position (a trainable copy of the RM)."""

    def __init__(self, reward_model):
        super().__init__()
        self.rm = copy.deepcopy(reward_model).train().requires_grad_(True)
        inner = self.rm.get_base_model() if hasattr(self.rm, "get_base_model") else self.rm
        self.backbone, self.head = getattr(inner, inner.base_model_prefix), inner.score

    def forward(self, hidden: torch.Tensor, *, input_ids, attention_mask, position_ids) -> torch.Tensor:
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        return self.head(h).float().squeeze(-1)


# ---------------------------------------------------------------- rollouts and forward passes


@dataclass
class Rollout:
    input_ids: torch.Tensor       # [B, P + R]: left-padded prompt, then the reply, right-padded
    attention_mask: torch.Tensor  # [B, P + R]
    prompt_width: int             # P
    mask: torch.Tensor            # [B, R] float: 1 on reply tokens up to and including the stop token
    ended: torch.Tensor           # [B] bool: the reply stopped by itself (<|im_end|> / <|endoftext|>)


@torch.no_grad()
def sample(actor, prompt_ids: list[list[int]], args: PPOArguments, stop_ids: list[int], pad_id: int, synced: bool = False) -> Rollout:
    """Sample one reply per prompt from the actor, exactly from its distribution at `temperature`."""
    width = max(map(len, prompt_ids))
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(prompt_ids):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        attention_mask[i, width - len(ids):] = 1
    device = next(actor.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    out = actor.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=args.temperature,
                         top_k=0, top_p=1.0, min_p=None, repetition_penalty=1.0, max_new_tokens=args.max_new_tokens,
                         eos_token_id=stop_ids, pad_token_id=pad_id, use_cache=True,
                         synced_gpus=synced)  # ZeRO-3: ranks keep stepping together, each gathering the shards
    reply = out[:, width:]
    is_stop = torch.isin(reply, torch.tensor(stop_ids, device=device))
    ended = is_stop.any(dim=1)
    length = torch.where(ended, is_stop.float().argmax(dim=1) + 1, torch.full_like(ended, reply.shape[1], dtype=torch.long))
    mask = (torch.arange(reply.shape[1], device=device)[None, :] < length[:, None]).float()
    return Rollout(out, torch.cat([attention_mask, mask.long()], dim=1), width, mask, ended)


def forward(model, critic, roll: Rollout, rows, temperature: float, with_entropy: bool = False):
    """Log-probabilities of the reply tokens (and values, entropy) for rollout rows `rows`.

    Runs the decoder once and applies the output projection only at reply positions: with a
    152k vocabulary the projection is most of the cost.
    """
    input_ids, attention_mask, mask = roll.input_ids[rows], roll.attention_mask[rows], roll.mask[rows]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    decoder, head = _backbone_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state
    P = roll.prompt_width
    states = hidden[:, P - 1 : -1]  # the state before each reply token
    keep = mask.bool()
    logits = head(states[keep]).float() / temperature
    targets = input_ids[:, P:][keep]
    logprobs = torch.zeros_like(mask)
    logprobs[keep] = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    values = entropy = None
    if critic is not None:
        values = critic(states, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if values.shape[1] != mask.shape[1]:  # a reward-model critic returns every position
            values = values[:, P - 1 : -1]
        values = values * mask
    if with_entropy:
        entropy = torch.zeros_like(mask)
        entropy[keep] = entropy_from_logits(logits.detach())
    return logprobs, values, entropy


# ---------------------------------------------------------------- DeepSpeed


def init_distributed(args: PPOArguments) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device). Under --deepspeed join the process group
    (nccl on GPUs, gloo on CPU ranks); each rank uses the GPU of its LOCAL_RANK."""
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # also where bitsandbytes puts a 4-bit model
    if not args.deepspeed:
        return 0, 1, device
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def to_device(model, device: torch.device):
    """Move a model to this rank's device; a bitsandbytes 4-bit model is already placed at load."""
    return model if getattr(model, "is_loaded_in_4bit", False) else model.to(device)


def read_deepspeed_config(path: str) -> dict:
    """The user's DeepSpeed JSON, checked before any model is loaded."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"{path}: zero_optimization.stage {stage}: expected 0, 1, 2 or 3")
    if "optimizer" in config or "scheduler" in config:
        raise UserError(f"{path}: drop the optimizer/scheduler block; ppo uses AdamW with a constant --learning_rate")
    return config


def fill_deepspeed_config(config: dict, micro_batch: int, world: int, max_grad_norm: float, dtype, trainable: int,
                          hidden_size: int) -> dict:
    """Replace the HF-style "auto" values (no Trainer does it for us here)."""
    fill = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "train_batch_size": micro_batch * world, "gradient_clipping": max_grad_norm}
    for key, value in fill.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    for key, wanted in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        if config.get(key, {}).get("enabled") == "auto":
            config[key]["enabled"] = dtype == wanted
    zero = config.get("zero_optimization", {})
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size"):
        if zero.get(key) == "auto":
            zero[key] = min(trainable, 500_000_000)  # small models: one bucket
    if zero.get("stage3_param_persistence_threshold") == "auto":
        zero["stage3_param_persistence_threshold"] = 10 * hidden_size  # as the HF Trainer fills it
    return config


class ActorCritic(torch.nn.Module):
    """One module for `deepspeed.initialize`: the trainable actor and critic, updated together."""

    def __init__(self, actor, critic):
        super().__init__()
        self.actor, self.critic = actor, critic


def gathered(engine):
    """ZeRO-3: the full parameters on every rank for the duration (saving); otherwise nothing to do."""
    if engine is None or engine.zero_optimization_stage() != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def mean_over_ranks(values: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)  # nccl needs GPU tensors
    dist.all_reduce(t)
    return dict(zip(values, (t / world).tolist()))


def gather_over_ranks(t: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return t
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


# ---------------------------------------------------------------- the loop


def default_learning_rate(actor, use_lora: bool) -> float:
    n = sum(p.numel() for p in actor.parameters())
    return PPO_LR_TINY if n < TINY_MODEL_PARAMS else (PPO_LR_LORA if use_lora else PPO_LR_FULL)


def prompt_batches(n: int, batch_size: int, total_steps: int, seed: int, rank: int = 0, world: int = 1):
    """Prompt indices of each PPO step on this rank: shuffled passes over the prompt set, each
    global batch of batch_size * world prompts dealt out like DistributedSampler (a short last
    batch is topped up by repeating its prompts, so every rank gets the same number)."""
    g = torch.Generator().manual_seed(seed)  # the same order on every rank
    step, size = 0, batch_size * world
    while True:
        order = torch.randperm(n, generator=g).tolist()
        for start in range(0, n, size):
            if step == total_steps:
                return
            batch = order[start : start + size]
            batch = [batch[i % len(batch)] for i in range(math.ceil(len(batch) / world) * world)]
            yield batch[rank::world]
            step += 1


def run(args: PPOArguments, lora: LoraArguments) -> dict:
    check_options(args, lora)
    ds_config = read_deepspeed_config(args.deepspeed) if args.deepspeed else None
    rank, world, device = init_distributed(args)
    conversations = load_prompts(args.prompts)  # validate the data before any model is loaded
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else None
    prepare_output_dir(args)
    torch.manual_seed(args.seed)
    policy_path = str(Path(args.policy).resolve())

    tokenizer = load_tokenizer(policy_path, trust_remote_code=args.trust_remote_code)
    fmt = args.chat_format(tokenizer, source=policy_path)  # the policy's saved template: the format it was trained in
    log(f"format: {fmt.description}")
    check_renderable(fmt, conversations)
    prompt_ids = [fmt.prompt_ids(c.messages, c.tools) for c in conversations]
    kept = [i for i, ids in enumerate(prompt_ids) if len(ids) <= args.max_prompt_length]
    if len(kept) < len(prompt_ids):
        log(f"ppo: skipped {len(prompt_ids) - len(kept)} of {len(prompt_ids)} prompts longer than max_prompt_length={args.max_prompt_length}")
    if not kept:
        raise UserError(f"{args.prompts}: no prompt fits in max_prompt_length={args.max_prompt_length} tokens")
    conversations, prompt_ids = [conversations[i] for i in kept], [prompt_ids[i] for i in kept]

    actor, reference = load_actor(policy_path, lora, args.trust_remote_code, device)
    actor.eval()  # no dropout: rollout and update log-probabilities must come from the same function
    reward_model = None
    if args.reward_model:
        from .reward_model import load_reward_model, score_token_ids

        reward_model, _ = load_reward_model(args.reward_model)
        reward_model = to_device(reward_model, device).requires_grad_(False)
    hidden_size = actor.config.get_text_config().hidden_size
    critic = RewardModelCritic(reward_model) if args.critic == "reward_model" else ValueHead(hidden_size)
    critic = critic.to(device).eval()
    params = [p for p in actor.parameters() if p.requires_grad] + list(critic.parameters())
    lr = args.learning_rate or default_learning_rate(actor, lora.use_lora)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, args.adam_beta2), weight_decay=args.weight_decay,
                                  fused=True)  # one pass over each tensor: the 152k-row embedding dominates
    n_trainable = sum(p.numel() for p in params)  # counted before ZeRO-3 partitions them
    engine = None
    if args.deepspeed:
        import deepspeed

        config = fill_deepspeed_config(ds_config, args.mini_batch_size or args.per_device_train_batch_size, world,
                                  args.max_grad_norm, next(actor.parameters()).dtype, n_trainable, hidden_size)
        engine, optimizer, _, _ = deepspeed.initialize(model=ActorCritic(actor, critic), optimizer=optimizer, config=config)
        log(f"ppo: DeepSpeed ZeRO stage {engine.zero_optimization_stage()} on {world} ranks")
        print_zero3_partition(actor)
    zero3 = engine is not None and engine.zero_optimization_stage() == 3
    if rank:
        torch.manual_seed(args.seed + rank)  # the same initial weights everywhere, different samples per rank
    kl_ctl = AdaptiveKLController(args.kl_coef, args.target_kl if args.adaptive_kl else None, args.kl_horizon)

    stop_ids = tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    pad_id = tokenizer.pad_token_id
    B = args.per_device_train_batch_size
    steps_per_epoch = math.ceil(len(prompt_ids) / (B * world))
    total_steps = max(1, math.ceil(args.num_train_epochs * steps_per_epoch))
    os.makedirs(args.output_dir, exist_ok=True)
    log_path = os.path.join(args.output_dir, "ppo_log.jsonl")
    log(f"ppo: {len(prompt_ids)} prompts, {total_steps} steps of {B * world} rollouts, lr {lr:g}, "
        f"{n_trainable:,} trainable parameters, reward from {args.reward_model or args.reward_fn}")
    history, start = [], time.time()
    with open(log_path, "w", encoding="utf-8") if rank == 0 else contextlib.nullcontext() as log_file:
        for step, batch in enumerate(prompt_batches(len(prompt_ids), B, total_steps, args.seed, rank, world), start=1):
            # 1. rollouts
            roll = sample(actor, [prompt_ids[i] for i in batch], args, stop_ids, pad_id, synced=zero3)
            mask, rows = roll.mask, torch.arange(len(batch), device=device)
            replies = [roll.input_ids[i, roll.prompt_width:][mask[i].bool()].tolist() for i in range(len(batch))]
            if reward_model is not None:
                scores = score_token_ids(reward_model, [prompt_ids[b] + r for b, r in zip(batch, replies)]).to(device)
            else:
                texts = tokenizer.batch_decode(replies, skip_special_tokens=True)
                scores = torch.tensor([call_reward_fn(reward_fn, args.reward_fn, conversations[b].id, conversations[b].messages, t)
                                       for b, t in zip(batch, texts)], device=device)
            scores = scores - args.missing_eos_penalty * (~roll.ended).float()

            # 2. log-probabilities, values, KL penalty, advantages (no gradients)
            with torch.no_grad():
                old_logprobs, old_values, entropy = forward(actor, critic, roll, rows, args.temperature, with_entropy=True)
                with reference() as ref_model:
                    ref_logprobs, _, _ = forward(ref_model, None, roll, rows, args.temperature)
                kl = kl_estimate(old_logprobs, ref_logprobs, args.kl_estimator) * mask
                rewards = token_rewards(scores, kl, mask, kl_ctl.value)
                if args.whiten_rewards:
                    rewards = masked_whiten(rewards, mask, shift_mean=False)
                advantages, returns = gae(rewards, old_values, mask, args.gamma, args.lam)
                if args.whiten_advantages:
                    advantages = masked_whiten(advantages, mask)

            # 3. PPO epochs over minibatches
            stats = {"policy_loss": [], "value_loss": [], "clipfrac": [], "value_clipfrac": [], "approx_kl": []}
            for _ in range(args.ppo_epochs):
                for mb in torch.randperm(len(batch)).to(device).split(args.mini_batch_size or len(batch)):
                    logprobs, values, _ = forward(actor, critic, roll, mb, args.temperature)
                    pg, pg_clip = policy_loss(logprobs, old_logprobs[mb], advantages[mb], mask[mb], args.cliprange)
                    vf, vf_clip = value_loss(values, old_values[mb], returns[mb], mask[mb], args.cliprange_value)
                    loss = pg + args.vf_coef * vf
                    if mean_over_ranks({"finite": float(torch.isfinite(loss))}, world, device)["finite"] < 1:  # all ranks stop together
                        raise UserError(f"ppo step {step}: the loss is not finite (diverged); lower --learning_rate")
                    if engine is not None:  # DeepSpeed averages gradients over ranks, clips and steps
                        engine.backward(loss)
                        engine.step()
                    else:
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                        optimizer.step()
                    for k, v in zip(stats, (pg, vf, pg_clip, vf_clip, 0.5 * masked_mean((logprobs - old_logprobs[mb]) ** 2, mask[mb]))):
                        stats[k].append(v.item())

            # 4. log (averaged over ranks), adapt the KL coefficient (the same on every rank)
            all_scores = gather_over_ranks(scores.float(), world)
            averaged = mean_over_ranks({
                "kl": (kl_estimate(old_logprobs, ref_logprobs, "k1") * mask).sum(1).mean().item(),
                "entropy": masked_mean(entropy, mask).item(),
                **{k: sum(v) / len(v) for k, v in stats.items()},
                "response_len_mean": mask.sum(1).mean().item(),
                "ended_frac": roll.ended.float().mean().item(),
            }, world, device)
            row = {
                "step": step,
                "epoch": round(step / steps_per_epoch, 3),
                "rollouts": len(all_scores),
                "reward_mean": all_scores.mean().item(),
                "reward_std": all_scores.std().item() if len(all_scores) > 1 else 0.0,
                "kl_coef": kl_ctl.value,
                **averaged,
                "elapsed_s": round(time.time() - start, 1),
            }
            kl_ctl.update(row["kl"], len(all_scores))
            history.append(row)
            if log_file is not None:
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
            log(f"ppo step {step}/{total_steps}  reward {row['reward_mean']:+.3f}  kl {row['kl']:.3f}  entropy {row['entropy']:.3f}  "
                f"len {row['response_len_mean']:.1f}  policy_loss {row['policy_loss']:+.4f}  value_loss {row['value_loss']:.4f}  "
                f"({row['elapsed_s']:.0f}s)")

    adapter = hasattr(actor, "peft_config")
    with gathered(engine):  # every rank holds the full weights now; rank 0 writes them
        if rank == 0:
            save(actor, critic, tokenizer, args.output_dir, adapter=adapter)
    if rank != 0:
        return {}
    metrics = {"steps": total_steps, "runtime_s": round(time.time() - start, 1), "learning_rate": lr,
               "reward_first": history[0]["reward_mean"], "reward_last": history[-1]["reward_mean"],
               "kl_last": history[-1]["kl"], "kl_max": max(h["kl"] for h in history)}
    with open(os.path.join(args.output_dir, "ppo_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    write_run_report(args.output_dir, metrics=metrics, log_history=history, model_path=policy_path, kind="ppo", chat_format=fmt.description,
                     adapter=adapter)
    log(how_to_load(args.output_dir, adapter))
    return metrics


def save(actor, critic, tokenizer, out: str, adapter: bool) -> None:
    """Like an SFT output: full safetensors or the PEFT adapter, plus tokenizer and generation config.
    The value head goes beside it (value_head.safetensors) for resuming or inspection."""
    if adapter:
        if "reference" in actor.peft_config:
            actor.delete_adapter("reference")
        actor.save_pretrained(out)
        actor.get_base_model().generation_config.save_pretrained(out)
    else:
        actor.save_pretrained(out)
        actor.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if isinstance(critic, ValueHead):
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in critic.state_dict().items()}, os.path.join(out, "value_head.safetensors"))


def main(argv: list[str] | None = None) -> dict:
    return run(*parse((PPOArguments, LoraArguments), argv, prog="qwen-tune ppo"))
