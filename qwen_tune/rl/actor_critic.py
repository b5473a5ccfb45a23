"""The models of an RL run: the trainable actor with its frozen reference (the starting policy), critics,
and the forward pass that reads reply log-probabilities and values from them.

The reference is a context manager that yields the model to score with: with LoRA it is the same
weights with the adapter switched off (no second copy in memory), for an SFT adapter trained further
a frozen copy of that adapter, and for full training a frozen second model.
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch

from ..options import LoraOptions
from ..models.trained import load_trained
from ..models.lora import add_lora
from ..models.model import is_adapter, load_model
from ..models.tokenizer import save_tokenizer
from .ppo_math import entropy_from_logits
from .rollouts import Rollout
from ..train.loss import backbone_and_head
from ..train.deepspeed_loop import to_device


def load_actor(policy: str, lora: LoraOptions, trust_remote_code: bool, device: torch.device):
    """-> (actor, reference context). The reference is the frozen starting policy:
    LoRA on a full model: the adapter switched off; an SFT adapter trained further: a frozen copy
    of that adapter (PEFT multi-adapter); full training: a second, frozen model."""
    if is_adapter(policy):
        actor = to_device(load_trained(policy, is_trainable=lora.use_lora, trust_remote_code=trust_remote_code), device)
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


def forward(model, critic, roll: Rollout, rows, temperature: float, with_entropy: bool = False):
    """Log-probabilities of the reply tokens (and values, entropy) for rollout rows `rows`.

    Runs the decoder once and applies the output projection only at reply positions: with a
    152k vocabulary the projection is most of the cost.
    """
    input_ids, attention_mask, mask = roll.input_ids[rows], roll.attention_mask[rows], roll.mask[rows]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    decoder, head = backbone_and_head(model)
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


class ActorCritic(torch.nn.Module):
    """One module for `deepspeed.initialize`: the trainable actor and critic, updated together."""

    def __init__(self, actor, critic):
        super().__init__()
        self.actor, self.critic = actor, critic


def save_actor_critic(actor, critic, tokenizer, out: str, adapter: bool) -> None:
    """The trained policy like an SFT output: full safetensors or the PEFT adapter, plus tokenizer and generation config.
    The value head goes beside it (value_head.safetensors) for resuming or inspection."""
    if adapter:
        if "reference" in actor.peft_config:
            actor.delete_adapter("reference")
        actor.save_pretrained(out)
        actor.get_base_model().generation_config.save_pretrained(out)
    else:
        actor.save_pretrained(out)
        actor.generation_config.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    if isinstance(critic, ValueHead):
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in critic.state_dict().items()}, os.path.join(out, "value_head.safetensors"))
