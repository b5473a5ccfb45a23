"""KTO, Kahneman-Tversky Optimization (`qwen-tune kto`, Ethayarajh et al. 2024): preference learning from replies
labelled desirable or undesirable one at a time (thumbs up / down), no pairs needed.

Each reply's implicit reward is beta times its log-ratio to the reference (the start model, or the base with the LoRA
adapter off, as in dpo); KTO pushes desirable rewards above, and undesirable ones below, a reference point: the
policy's KL divergence from the reference, estimated on the batch's prompts paired with other samples' replies (each
sample i with sample i-1's reply, data/collate.py UnpairedCollator) and never differentiated. The formulas are TRL's
KTOTrainer (loss_type "kto" and "apo_zero_unpaired"), with logratio = log pi(y|x) - log ref(y|x):
    kl = max(0, mean over the batch (all ranks) of log pi(y'|x) - log ref(y'|x))
    kto:                desirable 1 - sigmoid(beta * (logratio - kl))      undesirable 1 - sigmoid(beta * (kl - logratio))
    apo_zero_unpaired:  desirable 1 - sigmoid(beta * logratio)             undesirable sigmoid(beta * logratio)
    loss = mean over the batch of desirable_weight * desirable losses and undesirable_weight * undesirable losses
Replies, policy (full, LoRA or Q-LoRA), packing and the run's safety are the pair methods' (train/pair_trainer.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.collate import UnpairedCollator
from ..data.unpaired import encode_unpaired
from ..errors import UserError
from ..options import LearningRates, Method, TrainingArguments, load
from ..train.loss import SequenceLogprobs, sequence_logprobs
from ..train.pair_trainer import (POLICY_OPTION_GROUPS, FrozenReference, PairLossTrainer, load_frozen_start_model,
                                  load_pairs, load_policy, train_and_finish, trainer_inputs)

LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass
class KTOTrainingArguments(TrainingArguments):
    """Our training options (the seed's flags and defaults) plus KTO's (TRL's KTOConfig names and defaults)."""

    beta: float = field(default=0.1, metadata={"help": "Strength of the pull towards the reference model (higher = stay closer)."})
    loss_type: str = field(default="kto", metadata={"help": "kto (Ethayarajh et al. 2024) or apo_zero_unpaired (D'Oosterlinck et al. 2024: "
                                                            "no KL term; for replies better than the model's own).",
                                                    "choices": list(LOSS_TYPES)})
    desirable_weight: float = field(default=1.0, metadata={"help": "Weight of the desirable replies' losses (to balance unequal counts: keep "
                                                                   "desirable_weight * #desirable / (undesirable_weight * #undesirable) in [1, 4/3])."})
    undesirable_weight: float = field(default=1.0, metadata={"help": "Weight of the undesirable replies' losses."})


def check_options(values: dict[str, dict]) -> None:
    train = values["train"]
    if train["loss_type"] == "kto" and train["per_device_train_batch_size"] < 2:
        raise UserError(f"--per_device_train_batch_size {train['per_device_train_batch_size']}: KTO estimates its KL term "
                        "from each prompt paired with another sample's reply in the same batch, so it needs 2 or more "
                        "(or --loss_type apo_zero_unpaired, which has no KL term)")
    for name in ("desirable_weight", "undesirable_weight"):
        if train[name] <= 0:
            raise UserError(f"--{name} {train[name]}: must be > 0 (default 1.0)")


METHOD = Method(
    "kto",
    groups={**POLICY_OPTION_GROUPS, "train": KTOTrainingArguments},
    learning_rates=LearningRates(full=1e-6, lora=1e-5),  # TRL's KTOConfig; an adapter's update is scaled down by alpha / r
    resolve=check_options,
)


def kto_loss(logratios: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float, loss_type: str,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Each reply's weighted loss from its log-ratio to the reference, its label and the batch's KL estimate."""
    if loss_type == "kto":
        losses = torch.where(desirable, 1 - torch.sigmoid(beta * (logratios - kl)), 1 - torch.sigmoid(beta * (kl - logratios)))
    else:  # apo_zero_unpaired
        losses = torch.where(desirable, 1 - torch.sigmoid(beta * logratios), torch.sigmoid(beta * logratios))
    return losses * torch.where(desirable, desirable_weight, undesirable_weight).to(losses.dtype)


class KTOLossTrainer(FrozenReference, PairLossTrainer):
    """The KTO loss; logs TRL's names: kl, rewards/{chosen,rejected,margins} (desirable, undesirable) and logps/*."""

    SEQUENCES_PER_SAMPLE = 1

    def pair_loss(self, model, inputs, policy: SequenceLogprobs):
        n, desirable = len(policy.sums), inputs["label"]
        logratios = policy.sums - self.reference_logprobs(model, inputs, n)
        kl = torch.zeros((), dtype=logratios.dtype, device=logratios.device)
        if self.args.loss_type == "kto":
            with torch.no_grad():
                mismatched = sequence_logprobs(model, inputs["kl"], n) - self.reference_logprobs(model, inputs["kl"], n)
                kl = self.accelerator.gather(mismatched.mean()[None]).mean().clamp(min=0)
        losses = kto_loss(logratios, desirable, kl, self.args.beta, self.args.loss_type,
                          self.args.desirable_weight, self.args.undesirable_weight)
        rewards, logps = self.args.beta * logratios.detach(), policy.sums.detach()
        metrics = {"kl": kl, "rewards/chosen": rewards[desirable], "rewards/rejected": rewards[~desirable],
                   "logps/chosen": logps[desirable], "logps/rejected": logps[~desirable]}
        return losses.mean(), metrics

    def averaged(self, mode: str) -> dict[str, float]:
        """TRL's rewards/margins: the mean desirable reward minus the mean undesirable one, since the last log."""
        metrics = super().averaged(mode)
        if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return metrics


def run(config, callbacks: tuple = ()) -> dict:
    """`callbacks`: extra Trainer callbacks (tests use them to trace batches and inject faults)."""
    replies = load_pairs(config, encode_unpaired)
    policy = load_policy(replies, config.lora, config.vision)
    reference = None if config.lora.use_lora else load_frozen_start_model(replies)  # an adapter: the base, adapter off
    trainer = KTOLossTrainer(reference=reference, **trainer_inputs(replies, policy, callbacks, collator=UnpairedCollator))
    return train_and_finish(trainer, replies, config, kind="kto")


def main(argv: list[str] | None = None, callbacks: tuple = ()) -> dict:
    return run(load(METHOD, argv), callbacks=callbacks)
