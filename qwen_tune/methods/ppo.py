"""RLHF stage 2: PPO on an SFT policy against a reward model or a reward function.

Our own implementation (TRL removed its PPOTrainer). Reads top to bottom like the algorithm:
for each batch of prompts, sample replies (prompts rendered by the policy's chat template) from the actor (stopping at `<|im_end|>`),
score them, compute per-token rewards (-kl_coef * KL(actor || reference) + the score on the
last token), values and GAE advantages, then run several epochs of clipped PPO updates over
minibatches. The formulas live in `rl/ppo_math.py`.

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

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..data.chat_format import check_renderable
from ..data.read import load_prompts
from ..errors import UserError
from ..models.model import is_vision_language
from ..options import FormatOptions, LoraOptions, Method, load, prepare_run, set_chat_format
from ..rl.ppo_math import (
    AdaptiveKLController,
    gae,
    kl_estimate,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from .ppo_options import PPO_LR_FULL, PPO_LR_LORA, PPO_LR_TINY, TINY_MODEL_PARAMS, PPOArguments, check_options, check_paths
from ..report import card_path, write_run_report
from ..rl.reward_functions import call_reward_fn, load_batch_rewards, load_reward_fn, weighted_batch_rewards
from ..rl.actor_critic import ActorCritic, RewardModelCritic, ValueHead, forward, load_actor, save_actor_critic
from ..rl.rollouts import collapse_warning, sample
from ..models.tokenizer import ENDOFTEXT, IM_END, load_tokenizer
from ..train import ownership
from ..train.deepspeed_loop import (
    fill_deepspeed_config,
    gather_over_ranks,
    gathered,
    init_distributed,
    mean_over_ranks,
    read_deepspeed_config,
    to_device,
)
from ..train.distributed import log, print_zero3_partition
from ..train.loop_state import load_engine_checkpoint, load_loop_checkpoint, save_engine_checkpoint, save_loop_checkpoint
from ..train.finish import clean_up_checkpoints, how_to_load, publish
from ..train.stop_signal import StopSignal, exit_after_saving

METHOD = Method("ppo", groups={"ppo": PPOArguments, "format": FormatOptions, "lora": LoraOptions}, model_option=("ppo", "policy"),
                resolve=check_options, run_group="ppo")


def run(config) -> dict:
    args, lora = config.ppo, config.lora
    check_paths(args)
    prepared = prepare_run(config)
    ds_config = read_deepspeed_config(args.deepspeed) if args.deepspeed else None
    rank, world, device = init_distributed(bool(args.deepspeed))
    policy_path = str(Path(args.policy).resolve())
    rewards = Rewards(args, device)  # the reward functions, each checked
    tokenizer, fmt, conversations, prompt_ids = served_prompts(args, config.format, policy_path)  # before any model loads
    rewards.load_model()
    models = Trainables.build(args, lora, policy_path, rewards.model, ds_config, world, device)
    if rank:
        torch.manual_seed(args.seed + rank)  # the same initial weights everywhere, different samples per rank
    kl_ctl = AdaptiveKLController(args.kl_coef, args.target_kl if args.adaptive_kl else None, args.kl_horizon)
    steps_per_epoch = math.ceil(len(prompt_ids) / (args.per_device_train_batch_size * world))
    total_steps = max(1, math.ceil(args.num_train_epochs * steps_per_epoch))
    rollouts = min(args.per_device_train_batch_size * world, math.ceil(len(prompt_ids) / world) * world)  # prompt_batches
    log(f"ppo: {len(prompt_ids)} prompts, {total_steps} step{'s' * (total_steps != 1)} of {rollouts} rollouts, "
        f"lr {models.lr:g}, {models.n_trainable:,} trainable parameters, reward from {rewards.description}")
    history, resumed_step, runtime_before = [], 0, 0.0
    if prepared.resume_from:  # weights, AdamW, RNG, KL coefficient and log; the prompt order replays from the seed
        state = models.load_checkpoint(prepared.resume_from)
        resumed_step, history, kl_ctl.value = state["step"], state["history"], state["kl_coef"]
        runtime_before = state.get("runtime_s", 0.0)  # the earlier segments' time: elapsed_s and runtime_s span the run
        log(f"ppo: resumed from {prepared.resume_from} after step {resumed_step}")
    stop_ids, start, recent = tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT]), time.time() - runtime_before, []
    batches = prompt_batches(len(prompt_ids), args.per_device_train_batch_size, total_steps, args.seed, rank, world)
    with PPOLog(args.output_dir, history, rank) as ppo_log, StopSignal(args.save_steps > 0) as stop:
        for step, batch in enumerate(batches, start=1):
            if step <= resumed_step:
                continue
            # 1. rollouts, scored
            roll = sample(models.actor, [prompt_ids[i] for i in batch], temperature=args.temperature,
                          max_new_tokens=args.max_new_tokens, stop_ids=stop_ids, pad_id=tokenizer.pad_token_id, synced=models.zero3)
            replies = [roll.input_ids[i, roll.prompt_width:][roll.mask[i].bool()].tolist() for i in range(len(batch))]
            texts = tokenizer.batch_decode(replies, skip_special_tokens=True)
            scores = rewards([prompt_ids[b] for b in batch], [conversations[b] for b in batch], replies, texts)
            scores = scores - args.missing_eos_penalty * (~roll.ended).float()
            # 2. log-probabilities, values, KL penalty, advantages (no gradients)
            batch_state = score_tokens(models, roll, scores, kl_ctl.value, args)
            # 3. PPO epochs over minibatches
            all_scores = gather_over_ranks(scores.float(), world)
            stats = ppo_epochs(models, roll, batch_state, all_scores, args, step, world, device)
            # 4. log (averaged over ranks), adapt the KL coefficient (the same on every rank)
            row = step_row(step, steps_per_epoch, roll, batch_state, stats, all_scores, kl_ctl.value, start, world, device)
            kl_ctl.update(row["kl"], len(all_scores))
            recent = (recent + [(texts, row["reward_mean"])])[-3:]
            warning = collapse_warning([t for t, _ in recent], [r for _, r in recent], max(h["reward_mean"] for h in history + [row]))
            if warning:
                row["collapse"] = warning
                log(f"ppo step {step}: warning: {warning}")
            history.append(row)
            ppo_log.write(row, total_steps)
            # 5. checkpoint every --save_steps (the last step too: a kill in the final save resumes from it), and
            #    on SIGTERM/SIGINT before exiting
            stopping = stop.agreed(device) and step < total_steps
            if args.save_steps > 0 and (step % args.save_steps == 0 or stopping):
                models.save_checkpoint(args.output_dir, step, {"history": history, "kl_coef": kl_ctl.value,
                                                               "runtime_s": time.time() - start}, args.save_total_limit)
            if stopping:
                exit_after_saving(stop.signum, step, args.output_dir)
    return finish(args, models, tokenizer, fmt, policy_path, history, total_steps, start, rank)


def served_prompts(args: PPOArguments, format_options: FormatOptions, policy_path: str):
    """(tokenizer, format, conversations, prompt ids): the prompts validated and rendered in the policy's saved
    template, the format it was trained in; those over --max_prompt_length skipped and counted."""
    conversations = load_prompts(args.prompts, seed=args.seed, log=log)
    tokenizer = load_tokenizer(policy_path, trust_remote_code=args.trust_remote_code)
    fmt = set_chat_format(tokenizer, format_options, source=policy_path)
    log(f"format: {fmt.description}")
    check_renderable(fmt, conversations)
    prompt_ids = [fmt.prompt_ids(c.messages, c.tools) for c in conversations]
    kept = [i for i, ids in enumerate(prompt_ids) if len(ids) <= args.max_prompt_length]
    if len(kept) < len(prompt_ids):
        log(f"ppo: skipped {len(prompt_ids) - len(kept)} of {len(prompt_ids)} prompts longer than max_prompt_length={args.max_prompt_length}")
    if not kept:
        raise UserError(f"{args.prompts}: no prompt fits in max_prompt_length={args.max_prompt_length} tokens")
    return tokenizer, fmt, [conversations[i] for i in kept], [prompt_ids[i] for i in kept]


class Rewards:
    """The score of each reply: a reward model's, plus reward functions in TRL's convention, or --reward_fn's."""

    def __init__(self, args: PPOArguments, device):
        self.args, self.device = args, device
        self.fn = load_reward_fn(args.reward_fn) if args.reward_fn else None
        self.funcs = load_batch_rewards(args.reward_funcs, args.reward_timeout or None) if args.reward_funcs else []
        self.model = None
        self.description = ", ".join(filter(None, (args.reward_model, args.reward_funcs, args.reward_fn)))

    def load_model(self) -> None:
        if self.args.reward_model:
            from ..rl.reward_models import load_reward_model

            model, _ = load_reward_model(self.args.reward_model, trust_remote_code=self.args.trust_remote_code)
            self.model = to_device(model, self.device).requires_grad_(False)

    def __call__(self, prompt_ids: list, conversations: list, replies: list, texts: list[str]) -> torch.Tensor:
        args, scores = self.args, torch.zeros(len(replies), device=self.device)
        if self.model is not None:
            from ..rl.reward_models import score_token_ids

            scores += score_token_ids(self.model, [p + r for p, r in zip(prompt_ids, replies)]).to(self.device).float()
        if self.funcs:
            scores += torch.tensor(weighted_batch_rewards(self.funcs, args.reward_weights, conversations, texts), device=self.device)
        if self.fn is not None:
            scores += torch.tensor([call_reward_fn(self.fn, args.reward_fn, c.id, c.messages, t, args.reward_timeout or None)
                                    for c, t in zip(conversations, texts)], device=self.device)
        return scores


@dataclass
class Trainables:
    """What PPO updates and how: the actor (its frozen reference beside it), the critic, AdamW or DeepSpeed's engine."""

    actor: torch.nn.Module
    reference: Callable  # a context manager that yields the model to score the reference log-probabilities with
    critic: torch.nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    engine: object | None
    lr: float
    n_trainable: int

    @classmethod
    def build(cls, args: PPOArguments, lora: LoraOptions, policy_path: str, reward_model, ds_config, world: int, device):
        actor, reference = load_actor(policy_path, lora, args.trust_remote_code, device)
        actor.eval()  # no dropout: rollout and update log-probabilities must come from the same function
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

            settings = fill_deepspeed_config(ds_config, args.mini_batch_size or args.per_device_train_batch_size, world,
                                             args.max_grad_norm, next(actor.parameters()).dtype, n_trainable, hidden_size)
            engine, optimizer, _, _ = deepspeed.initialize(model=ActorCritic(actor, critic), optimizer=optimizer, config=settings)
            log(f"ppo: DeepSpeed ZeRO stage {engine.zero_optimization_stage()} on {world} ranks")
            print_zero3_partition(actor)
        return cls(actor, reference, critic, params, optimizer, engine, lr, n_trainable)

    @property
    def zero3(self) -> bool:
        return self.engine is not None and self.engine.zero_optimization_stage() == 3

    def update(self, loss: torch.Tensor, max_grad_norm: float) -> None:
        if self.engine is not None:  # DeepSpeed averages gradients over ranks, clips and steps
            self.engine.backward(loss)
            self.engine.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
            self.optimizer.step()

    def save_checkpoint(self, out: str, step: int, state: dict, limit: int | None) -> None:
        if self.engine is not None:
            save_engine_checkpoint(out, step, self.engine, state, limit)
        else:
            save_loop_checkpoint(out, step, {"actor": self.actor, "critic": self.critic}, self.optimizer, state, limit)

    def load_checkpoint(self, path: str) -> dict:
        if self.engine is not None:
            return load_engine_checkpoint(path, self.engine)
        return load_loop_checkpoint(path, {"actor": self.actor, "critic": self.critic}, self.optimizer)


def score_tokens(models: Trainables, roll, scores: torch.Tensor, kl_coef: float, args: PPOArguments) -> dict:
    """Per-token log-probabilities and values of the rollout policy, the reference's log-probabilities, the KL-penalised
    rewards, GAE advantages and returns; no gradients."""
    mask, rows = roll.mask, torch.arange(len(scores), device=scores.device)
    with torch.no_grad():
        logprobs, values, entropy = forward(models.actor, models.critic, roll, rows, args.temperature, with_entropy=True)
        with models.reference() as ref_model:
            ref_logprobs, _, _ = forward(ref_model, None, roll, rows, args.temperature)
        rewards = token_rewards(scores, kl_estimate(logprobs, ref_logprobs, args.kl_estimator) * mask, mask, kl_coef)
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
    return {"logprobs": logprobs, "values": values, "entropy": entropy, "ref_logprobs": ref_logprobs,
            "advantages": advantages, "returns": returns}


def ppo_epochs(models: Trainables, roll, old: dict, all_scores: torch.Tensor, args: PPOArguments, step: int, world: int,
               device) -> dict[str, list[float]]:
    """Clipped PPO updates over minibatches, --ppo_epochs times. None when every reward is equal (nothing preferred:
    the whitened advantages would only be the critic's errors scaled up, which pushed the converged embedded policy
    from "I prefer cats." to "I cats"), and none after a minibatch moved past --target_approx_kl."""
    stats = {"policy_loss": [], "value_loss": [], "clipfrac": [], "value_clipfrac": [], "approx_kl": []}
    if len(all_scores) > 1 and bool(all_scores.std() == 0):
        return stats
    mask = roll.mask
    for _ in range(args.ppo_epochs):
        for mb in torch.randperm(len(mask)).to(device).split(args.mini_batch_size or len(mask)):
            logprobs, values, _ = forward(models.actor, models.critic, roll, mb, args.temperature)
            pg, pg_clip = policy_loss(logprobs, old["logprobs"][mb], old["advantages"][mb], mask[mb], args.cliprange)
            vf, vf_clip = value_loss(values, old["values"][mb], old["returns"][mb], mask[mb], args.cliprange_value)
            loss = pg + args.vf_coef * vf
            if mean_over_ranks({"finite": float(torch.isfinite(loss))}, world, device)["finite"] < 1:  # all ranks stop together
                raise UserError(f"ppo step {step}: the loss is not finite (diverged); lower --learning_rate")
            approx_kl = 0.5 * masked_mean((logprobs - old["logprobs"][mb]) ** 2, mask[mb])
            if mean_over_ranks({"kl": approx_kl.item()}, world, device)["kl"] > args.target_approx_kl:
                return stats  # this minibatch's policy already moved past the target: stop the step's updates
            models.update(loss, args.max_grad_norm)
            for k, v in zip(stats, (pg, vf, pg_clip, vf_clip, approx_kl)):
                stats[k].append(v.item())
    return stats


def step_row(step: int, steps_per_epoch: int, roll, old: dict, stats: dict, all_scores: torch.Tensor, kl_coef: float,
             start: float, world: int, device) -> dict:
    """The step's line of ppo_log.jsonl, averaged over ranks."""
    mask = roll.mask
    averaged = mean_over_ranks({
        "kl": (kl_estimate(old["logprobs"], old["ref_logprobs"], "k1") * mask).sum(1).mean().item(),
        "entropy": masked_mean(old["entropy"], mask).item(),
        **{k: sum(v) / len(v) if v else 0.0 for k, v in stats.items()},
        "updates": float(len(stats["approx_kl"])),
        "response_len_mean": mask.sum(1).mean().item(),
        "ended_frac": roll.ended.float().mean().item(),
    }, world, device)
    return {
        "step": step,
        "epoch": round(step / steps_per_epoch, 3),
        "rollouts": len(all_scores),
        "reward_mean": all_scores.mean().item(),
        "reward_std": all_scores.std().item() if len(all_scores) > 1 else 0.0,
        "kl_coef": kl_coef,
        **averaged,
        "elapsed_s": round(time.time() - start, 1),
    }


class PPOLog:
    """OUT/ppo_log.jsonl (rank 0): the rows restored by a resume first, then one line per step as it ends."""

    def __init__(self, out: str, history: list[dict], rank: int):
        self.path, self.history, self.rank, self.file = os.path.join(out, "ppo_log.jsonl"), history, rank, None

    def __enter__(self):
        if self.rank == 0:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.file = open(self.path, "w", encoding="utf-8")
            for row in self.history:
                self.file.write(json.dumps(row) + "\n")
        return self

    def write(self, row: dict, total_steps: int) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        log(f"ppo step {row['step']}/{total_steps}  reward {row['reward_mean']:+.3f}  kl {row['kl']:.3f}  entropy {row['entropy']:.3f}  "
            f"len {row['response_len_mean']:.1f}  policy_loss {row['policy_loss']:+.4f}  value_loss {row['value_loss']:.4f}  "
            f"({row['elapsed_s']:.0f}s)")

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()
        return False


def finish(args: PPOArguments, models: Trainables, tokenizer, fmt, policy_path: str, history: list[dict], total_steps: int,
           start: float, rank: int) -> dict:
    """Save the policy like an SFT output (staged, then moved in and marked finished), with its report."""
    actor = models.actor
    adapter = hasattr(actor, "peft_config")
    card = card_path(args.output_dir) if rank == 0 else None
    with gathered(models.engine):  # every rank holds the full weights now; rank 0 writes them
        if rank == 0:
            save_actor_critic(actor, models.critic, tokenizer, ownership.staging_dir(args.output_dir), adapter=adapter)
    if rank != 0:
        return {}
    publish(args.output_dir, card, also=("ppo_metrics.json",))
    metrics = {"steps": total_steps, "runtime_s": round(time.time() - start, 1), "learning_rate": models.lr,
               "reward_first": history[0]["reward_mean"], "reward_last": history[-1]["reward_mean"],
               "kl_last": history[-1]["kl"], "kl_max": max(h["kl"] for h in history)}
    with open(os.path.join(args.output_dir, "ppo_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    vision_language = is_vision_language(actor.config)
    write_run_report(args.output_dir, metrics=metrics, log_history=history, model_path=policy_path, kind="ppo", chat_format=fmt.description,
                     adapter=adapter, vision_language=vision_language, card=card)
    ownership.mark_finished(args.output_dir, {"method": "ppo", "adapter": adapter})
    log(how_to_load(args.output_dir, adapter, vision_language=vision_language))
    clean_up_checkpoints(args.output_dir, args.keep_checkpoints)
    return metrics


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


def main(argv: list[str] | None = None) -> dict:
    return run(load(METHOD, argv))
