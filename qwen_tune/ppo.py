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
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .options import FormatOptions, LoraOptions, Method, RunArguments, load, prepare_run, set_chat_format
from .options.groups import Frozen
from .data.chat_format import check_renderable
from .data.read import load_prompts
from .errors import UserError
from .ppo_math import (
    AdaptiveKLController,
    gae,
    kl_estimate,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from .model import is_vision_language
from .report import card_path, write_run_report
from .reward_functions import DEFAULT_TIMEOUT_S, call_reward_fn, load_batch_rewards, load_reward_fn, weighted_batch_rewards
from .rl_models import ActorCritic, RewardModelCritic, ValueHead, forward, load_actor
from .rollouts import collapse_warning, sample
from .tokenizer import ENDOFTEXT, IM_END, load_tokenizer
from .train.deepspeed_loop import (
    fill_deepspeed_config,
    gather_over_ranks,
    gathered,
    init_distributed,
    mean_over_ranks,
    read_deepspeed_config,
    to_device,
)
from .train.distributed import log, print_zero3_partition
from .train.loop_state import load_engine_checkpoint, load_loop_checkpoint, save_engine_checkpoint, save_loop_checkpoint
from .train.stop_signal import StopSignal, exit_after_saving
from .train import ownership
from .train.outputs import clean_up_checkpoints, how_to_load, publish

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


# ---------------------------------------------------------------- options, prompts, rewards


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


METHOD = Method("ppo", groups={"ppo": PPOArguments, "format": FormatOptions, "lora": LoraOptions}, model_option=("ppo", "policy"),
                resolve=check_options, run_group="ppo")


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


def run(config) -> dict:
    args, lora = config.ppo, config.lora
    check_paths(args)
    prepared = prepare_run(config)
    ds_config = read_deepspeed_config(args.deepspeed) if args.deepspeed else None
    rank, world, device = init_distributed(bool(args.deepspeed))
    conversations = load_prompts(args.prompts, seed=args.seed, log=log)  # validate the data before any model is loaded
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else None
    reward_funcs = load_batch_rewards(args.reward_funcs, args.reward_timeout or None) if args.reward_funcs else []
    policy_path = str(Path(args.policy).resolve())

    tokenizer = load_tokenizer(policy_path, trust_remote_code=args.trust_remote_code)
    fmt = set_chat_format(tokenizer, config.format, source=policy_path)  # the policy's saved template: the format it was trained in
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

        reward_model, _ = load_reward_model(args.reward_model, trust_remote_code=args.trust_remote_code)
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
        f"{n_trainable:,} trainable parameters, reward from {', '.join(filter(None, (args.reward_model, args.reward_funcs, args.reward_fn)))}")
    history, start, resumed_step, recent = [], time.time(), 0, []
    trained = {"actor": actor, "critic": critic}
    if prepared.resume_from:  # weights, AdamW, RNG, KL coefficient and log; the prompt order replays from the seed
        state = (load_engine_checkpoint(prepared.resume_from, engine) if engine is not None
                 else load_loop_checkpoint(prepared.resume_from, trained, optimizer))
        resumed_step, history, kl_ctl.value = state["step"], state["history"], state["kl_coef"]
        log(f"ppo: resumed from {prepared.resume_from} after step {resumed_step}")
    checkpoints_on = args.save_steps > 0
    with open(log_path, "w", encoding="utf-8") if rank == 0 else contextlib.nullcontext() as log_file, StopSignal(checkpoints_on) as stop:
        for row in history if log_file is not None else ():
            log_file.write(json.dumps(row) + "\n")
        for step, batch in enumerate(prompt_batches(len(prompt_ids), B, total_steps, args.seed, rank, world), start=1):
            if step <= resumed_step:
                continue
            # 1. rollouts
            roll = sample(actor, [prompt_ids[i] for i in batch], temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                          stop_ids=stop_ids, pad_id=pad_id, synced=zero3)
            mask, rows = roll.mask, torch.arange(len(batch), device=device)
            replies = [roll.input_ids[i, roll.prompt_width:][mask[i].bool()].tolist() for i in range(len(batch))]
            texts = tokenizer.batch_decode(replies, skip_special_tokens=True)
            scores = torch.zeros(len(batch), device=device)
            if reward_model is not None:
                scores += score_token_ids(reward_model, [prompt_ids[b] + r for b, r in zip(batch, replies)]).to(device).float()
            if reward_funcs:
                scores += torch.tensor(weighted_batch_rewards(reward_funcs, args.reward_weights, [conversations[b] for b in batch],
                                                              texts), device=device)
            if reward_fn is not None:
                scores += torch.tensor([call_reward_fn(reward_fn, args.reward_fn, conversations[b].id, conversations[b].messages, t,
                                                         args.reward_timeout or None)
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

            # 3. PPO epochs over minibatches; none when every reward is equal (nothing preferred: the whitened
            #    advantages would only be the critic's errors scaled up, which pushed the converged embedded
            #    policy from "I prefer cats." to "I cats"), and none after a minibatch moved too far
            all_scores = gather_over_ranks(scores.float(), world)
            no_spread = len(all_scores) > 1 and bool(all_scores.std() == 0)
            stats = {"policy_loss": [], "value_loss": [], "clipfrac": [], "value_clipfrac": [], "approx_kl": []}
            for _ in range(0 if no_spread else args.ppo_epochs):
                for mb in torch.randperm(len(batch)).to(device).split(args.mini_batch_size or len(batch)):
                    logprobs, values, _ = forward(actor, critic, roll, mb, args.temperature)
                    pg, pg_clip = policy_loss(logprobs, old_logprobs[mb], advantages[mb], mask[mb], args.cliprange)
                    vf, vf_clip = value_loss(values, old_values[mb], returns[mb], mask[mb], args.cliprange_value)
                    loss = pg + args.vf_coef * vf
                    if mean_over_ranks({"finite": float(torch.isfinite(loss))}, world, device)["finite"] < 1:  # all ranks stop together
                        raise UserError(f"ppo step {step}: the loss is not finite (diverged); lower --learning_rate")
                    approx_kl = 0.5 * masked_mean((logprobs - old_logprobs[mb]) ** 2, mask[mb])
                    if mean_over_ranks({"kl": approx_kl.item()}, world, device)["kl"] > args.target_approx_kl:
                        break  # this minibatch's policy already moved past the target: stop the step's updates
                    if engine is not None:  # DeepSpeed averages gradients over ranks, clips and steps
                        engine.backward(loss)
                        engine.step()
                    else:
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                        optimizer.step()
                    for k, v in zip(stats, (pg, vf, pg_clip, vf_clip, approx_kl)):
                        stats[k].append(v.item())
                else:
                    continue
                break

            # 4. log (averaged over ranks), adapt the KL coefficient (the same on every rank)
            averaged = mean_over_ranks({
                "kl": (kl_estimate(old_logprobs, ref_logprobs, "k1") * mask).sum(1).mean().item(),
                "entropy": masked_mean(entropy, mask).item(),
                **{k: sum(v) / len(v) if v else 0.0 for k, v in stats.items()},
                "updates": float(len(stats["approx_kl"])),
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
            recent = (recent + [(texts, row["reward_mean"])])[-3:]
            warning = collapse_warning([t for t, _ in recent], [r for _, r in recent], max(h["reward_mean"] for h in history + [row]))
            if warning:
                row["collapse"] = warning
                log(f"ppo step {step}: warning: {warning}")
            history.append(row)
            if log_file is not None:
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
            log(f"ppo step {step}/{total_steps}  reward {row['reward_mean']:+.3f}  kl {row['kl']:.3f}  entropy {row['entropy']:.3f}  "
                f"len {row['response_len_mean']:.1f}  policy_loss {row['policy_loss']:+.4f}  value_loss {row['value_loss']:.4f}  "
                f"({row['elapsed_s']:.0f}s)")

            # 5. checkpoint (every --save_steps, the last step too: a kill in the final save resumes from it;
            #    and on SIGTERM/SIGINT before exiting)
            stopping = stop.agreed(device) and step < total_steps
            if checkpoints_on and (step % args.save_steps == 0 or stopping):
                state = {"history": history, "kl_coef": kl_ctl.value}
                if engine is not None:
                    save_engine_checkpoint(args.output_dir, step, engine, state, args.save_total_limit)
                else:
                    save_loop_checkpoint(args.output_dir, step, trained, optimizer, state, args.save_total_limit)
            if stopping:
                exit_after_saving(stop.signum, step, args.output_dir)

    adapter = hasattr(actor, "peft_config")
    card = card_path(args.output_dir) if rank == 0 else None
    with gathered(engine):  # every rank holds the full weights now; rank 0 writes them
        if rank == 0:
            save(actor, critic, tokenizer, ownership.staging_dir(args.output_dir), adapter=adapter)
    if rank != 0:
        return {}
    publish(args.output_dir, card, also=("ppo_metrics.json",))
    metrics = {"steps": total_steps, "runtime_s": round(time.time() - start, 1), "learning_rate": lr,
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
    return run(load(METHOD, argv))
