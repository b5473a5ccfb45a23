"""Sampling replies for RL: one reply per prompt, exactly from the policy's distribution at `temperature`
(no top-k/top-p), stopping at the end-of-turn token, with the mask of the reply tokens it learns from."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    input_ids: torch.Tensor       # [B, P + R]: left-padded prompt, then the reply, right-padded
    attention_mask: torch.Tensor  # [B, P + R]
    prompt_width: int             # P
    mask: torch.Tensor            # [B, R] float: 1 on reply tokens up to and including the stop token
    ended: torch.Tensor           # [B] bool: the reply stopped by itself (<|im_end|> / <|endoftext|>)


@torch.no_grad()
def sample(actor, prompt_ids: list[list[int]], *, temperature: float, max_new_tokens: int, stop_ids: list[int], pad_id: int,
           synced: bool = False) -> Rollout:
    """Sample one reply per prompt from the actor, exactly from its distribution at `temperature`."""
    width = max(map(len, prompt_ids))
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(prompt_ids):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        attention_mask[i, width - len(ids):] = 1
    device = next(actor.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    out = actor.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=temperature,
                         top_k=0, top_p=1.0, min_p=None, repetition_penalty=1.0, max_new_tokens=max_new_tokens,
                         eos_token_id=stop_ids, pad_token_id=pad_id, use_cache=True,
                         synced_gpus=synced)  # ZeRO-3: ranks keep stepping together, each gathering the shards
    reply = out[:, width:]
    is_stop = torch.isin(reply, torch.tensor(stop_ids, device=device))
    ended = is_stop.any(dim=1)
    length = torch.where(ended, is_stop.float().argmax(dim=1) + 1, torch.full_like(ended, reply.shape[1], dtype=torch.long))
    mask = (torch.arange(reply.shape[1], device=device)[None, :] < length[:, None]).float()
    return Rollout(out, torch.cat([attention_mask, mask.long()], dim=1), width, mask, ended)


def collapse_warning(recent_replies: list[list[str]], recent_rewards: list[float], best_reward: float) -> str | None:
    """A policy that collapsed: the last steps' replies all empty, or all one reply scoring below the run's best.
    (All one reply at the best reward is convergence, not collapse.) `recent_*`: one entry per step."""
    replies = [r.strip() for step in recent_replies for r in step]
    if len(recent_replies) < 3 or len(set(replies)) != 1:
        return None
    advice = "lower --learning_rate, raise --kl_coef, or check that the reward cannot be gamed"
    if not replies[0]:
        return f"every reply of the last {len(recent_replies)} steps was empty: the policy collapsed; {advice}"
    if max(recent_rewards) < best_reward:
        return (f"every reply of the last {len(recent_replies)} steps was {replies[0][:60]!r}, with reward "
                f"{recent_rewards[-1]:+.3f} below the run's best {best_reward:+.3f}: the policy collapsed; {advice}")
    return None
