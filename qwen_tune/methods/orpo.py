"""ORPO, Odds Ratio Preference Optimization (`qwen-tune orpo`, Hong et al. 2024): SFT and preference in one stage.

No reference model: the policy learns the chosen reply (its NLL) while an odds-ratio term pushes the odds of the
chosen reply above those of the rejected one, so it can start from a base model that never saw SFT. Pairs, policy
(full, LoRA or Q-LoRA), packing and the run's safety are dpo's (train/pair_trainer.py). The formulas are TRL's
ORPOTrainer (`odds_ratio_loss`), on the average log-prob per reply token, P = exp(mean log p):
    log_odds = (log P(c) - log P(r)) - (log(1 - P(c)) - log(1 - P(r)))
    loss = NLL(chosen reply tokens) - beta * mean(log sigmoid(log_odds))
One difference, on purpose: TRL's NLL also covers the prompt's tokens; here, as in the paper's L_SFT and in
`qwen-tune sft`, only the reply's (its mean over the batch's chosen reply tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..options import LearningRates, Method, TrainingArguments, load
from ..train.loss import SequenceLogprobs
from ..train.pair_trainer import (POLICY_OPTION_GROUPS, PairLossTrainer, load_pairs, load_policy, reward_metrics,
                                  train_and_finish, trainer_inputs)


@dataclass
class ORPOTrainingArguments(TrainingArguments):
    """Our training options (the seed's flags and defaults) plus ORPO's."""

    beta: float = field(default=0.1, metadata={"help": "Weight of the odds-ratio term next to the chosen reply's NLL (the paper's lambda; TRL's ORPOConfig beta)."})


METHOD = Method(
    "orpo",
    groups={**POLICY_OPTION_GROUPS, "train": ORPOTrainingArguments},
    learning_rates=LearningRates(full=1e-6, lora=1e-5),  # TRL's ORPOConfig; an adapter's update is scaled down by alpha / r
)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (branch at -log 2, as TRL does)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen: SequenceLogprobs, rejected: SequenceLogprobs, beta: float):
    """(loss, chosen NLL, log sigmoid(log odds) per pair, log odds per pair), from each side's log-prob sums and counts."""
    nll = -chosen.sums.sum() / chosen.counts.sum().clamp(min=1)
    chosen_logps, rejected_logps = chosen.means().float(), rejected.means().float()
    log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))
    ratio = F.logsigmoid(log_odds)
    return nll - beta * ratio.mean(), nll, ratio, log_odds


class ORPOLossTrainer(PairLossTrainer):
    """The ORPO loss; logs TRL's names: rewards/* (beta * average log-prob), logps/*, nll_loss, log_odds_ratio,
    log_odds_chosen."""

    def pair_loss(self, model, inputs, policy: SequenceLogprobs):
        chosen, rejected = policy.chosen_and_rejected()
        loss, nll, ratio, log_odds = orpo_loss(chosen, rejected, self.args.beta)
        logps_chosen, logps_rejected = chosen.means().detach(), rejected.means().detach()
        return loss, {**reward_metrics(self.args.beta * logps_chosen, self.args.beta * logps_rejected),
                      "logps/chosen": logps_chosen, "logps/rejected": logps_rejected, "nll_loss": nll,
                      "log_odds_ratio": ratio, "log_odds_chosen": log_odds}


def run(config, callbacks: tuple = ()) -> dict:
    """`callbacks`: extra Trainer callbacks (tests use them to trace batches and inject faults)."""
    pairs = load_pairs(config)
    trainer = ORPOLossTrainer(**trainer_inputs(pairs, load_policy(pairs, config.lora, config.vision), callbacks))
    return train_and_finish(trainer, pairs, config, kind="orpo")


def main(argv: list[str] | None = None, callbacks: tuple = ()) -> dict:
    return run(load(METHOD, argv), callbacks=callbacks)
