"""The models of an RL run: the trainable actor with its frozen reference (the starting policy), and critics.

The reference is a context manager that yields the model to score with: with LoRA it is the same
weights with the adapter switched off (no second copy in memory), for an SFT adapter trained further
a frozen copy of that adapter, and for full training a frozen second model.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from .args import LoraArguments
from .model import add_lora, is_adapter, load_model
from .train.deepspeed_loop import to_device


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
