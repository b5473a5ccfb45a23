"""SimPO, Simple Preference Optimization (`qwen-tune simpo`, Meng et al. 2024): DPO without a reference model.

The implicit reward of a reply is its average log-prob per token times beta (length-normalised, so a long reply
gains nothing for being long), and the chosen reward must beat the rejected one by a target margin gamma. Pairs,
policy (full, LoRA or Q-LoRA), packing and the run's safety are dpo's (train/pair_trainer.py); start from an SFT
model. The formula is TRL's CPOTrainer with loss_type="simpo" and cpo_alpha=0 (no NLL term), as TRL's docs give SimPO:
    loss = -log sigmoid(beta * (mean log p(c) - mean log p(r)) - gamma)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..options import LearningRates, Method, TrainingArguments, load
from ..train.loss import SequenceLogprobs
from ..train.pair_trainer import (POLICY_OPTION_GROUPS, PairLossTrainer, load_pairs, load_policy, reward_metrics,
                                  train_and_finish, trainer_inputs)


@dataclass
class SimPOTrainingArguments(TrainingArguments):
    """Our training options (the seed's flags and defaults) plus SimPO's."""

    beta: float = field(default=2.0, metadata={"help": "Scale of the reward, beta * average log-prob per reply token (the SimPO paper's 2.0; > 0)."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "Target reward margin of chosen over rejected (the paper's gamma; TRL's CPOConfig simpo_gamma)."})


def check_beta(values: dict[str, dict]) -> None:
    if values["train"]["beta"] <= 0:
        raise UserError(f"--beta {values['train']['beta']}: SimPO's reward scale must be > 0 (default 2.0)")


METHOD = Method(
    "simpo",
    groups={**POLICY_OPTION_GROUPS, "train": SimPOTrainingArguments},
    learning_rates=LearningRates(full=1e-6, lora=1e-5),  # TRL's CPOConfig; an adapter's update is scaled down by alpha / r
    resolve=check_beta,
)


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float, gamma: float):
    """Per-pair loss and rewards from average log-probs per reply token (TRL's `cpo_loss`, simpo branch)."""
    logits = (chosen_logps - rejected_logps) - gamma / beta
    return -F.logsigmoid(beta * logits), beta * chosen_logps.detach(), beta * rejected_logps.detach()


class SimPOLossTrainer(PairLossTrainer):
    """The SimPO loss; logs TRL's names: rewards/* (beta * average log-prob) and logps/* (average log-probs)."""

    def pair_loss(self, model, inputs, policy: SequenceLogprobs):
        chosen, rejected = (side.means() for side in policy.chosen_and_rejected())
        loss, chosen_rewards, rejected_rewards = simpo_loss(chosen, rejected, self.args.beta, self.args.simpo_gamma)
        return loss.mean(), {**reward_metrics(chosen_rewards, rejected_rewards),
                             "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()}


def run(config, callbacks: tuple = ()) -> dict:
    """`callbacks`: extra Trainer callbacks (tests use them to trace batches and inject faults)."""
    pairs = load_pairs(config)
    trainer = SimPOLossTrainer(**trainer_inputs(pairs, load_policy(pairs, config.lora, config.vision), callbacks))
    return train_and_finish(trainer, pairs, config, kind="simpo")


def main(argv: list[str] | None = None, callbacks: tuple = ()) -> dict:
    return run(load(METHOD, argv), callbacks=callbacks)
