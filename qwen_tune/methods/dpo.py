"""Direct Preference Optimization (`qwen-tune dpo`): the lighter alternative to reward model + PPO.

Reads top to bottom like the job: validate and tokenize the pairs in the run's chat template (prompt =
the rendered conversation up to the reply's body, reply = its body through `<|im_end|>`, exactly the
tokens SFT supervises), load the policy (full, LoRA or Q-LoRA) and the reference (a frozen copy of the
start model; with an adapter, the same model with the adapter disabled, so no second copy), train with
the HF Trainer on the DPO loss, save a plain Hugging Face directory (train/pair_trainer.py: all but the loss).

The loss is ours, not TRL's DPOTrainer: TRL re-tokenizes every pair with its own chat-template call
(which would train the `\\n` after `<|im_end|>` and turn control tokens typed into text into real ones)
and has no public way to take token ids (huggingface/trl#2368). The formulas are TRL's and the papers':
    logits = beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))
    sigmoid (DPO):  -log sigmoid(logits)      ipo: (logits / beta - 1 / (2 beta))^2      hinge: max(0, 1 - logits)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..options import LearningRates, Method, TrainingArguments, load
from ..train.loss import SequenceLogprobs
from ..train.pair_trainer import (POLICY_OPTION_GROUPS, FrozenReference, PairLossTrainer, load_frozen_start_model,
                                  load_pairs, load_policy, reward_metrics, train_and_finish, trainer_inputs)

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclass
class DPOTrainingArguments(TrainingArguments):
    """Our training options (the seed's flags and defaults) plus DPO's."""

    beta: float = field(default=0.1, metadata={"help": "Strength of the pull towards the reference model (higher = stay closer)."})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO, Rafailov et al. 2023), ipo (Azar et al. 2023) or hinge (SLiC).",
                                                        "choices": list(LOSS_TYPES)})


METHOD = Method(
    "dpo",
    groups={**POLICY_OPTION_GROUPS, "train": DPOTrainingArguments},
    learning_rates=LearningRates(full=1e-6, lora=1e-5),  # TRL's DPOConfig; an adapter's update is scaled down by alpha / r
)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float, loss_type: str):
    """Per-pair loss and implicit rewards from summed reply log-probabilities laid out [chosen..., rejected...]."""
    n = len(policy) // 2
    rewards = beta * (policy - reference).detach()
    margin = (policy[:n] - reference[:n]) - (policy[n:] - reference[n:])
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * margin)
    elif loss_type == "ipo":
        loss = (margin - 1 / (2 * beta)) ** 2
    else:  # hinge
        loss = torch.relu(1 - beta * margin)
    return loss, rewards[:n], rewards[n:]


class DPOLossTrainer(FrozenReference, PairLossTrainer):
    """The DPO loss against a frozen reference; logs rewards/{chosen,rejected,accuracies,margins} and logps/* like TRL."""

    def pair_loss(self, model, inputs, policy: SequenceLogprobs):
        reference = self.reference_logprobs(model, inputs, len(policy.sums))
        loss, chosen, rejected = dpo_loss(policy.sums, reference, self.args.beta, self.args.loss_type)
        logps_chosen, logps_rejected = policy.sums.detach().chunk(2)
        return loss.mean(), {**reward_metrics(chosen, rejected), "logps/chosen": logps_chosen, "logps/rejected": logps_rejected}


def run(config, callbacks: tuple = ()) -> dict:
    """`callbacks`: extra Trainer callbacks (tests use them to trace batches and inject faults)."""
    pairs = load_pairs(config)
    policy = load_policy(pairs, config.lora, config.vision)
    reference = None if config.lora.use_lora else load_frozen_start_model(pairs)  # an adapter: the base, adapter off
    trainer = DPOLossTrainer(reference=reference, **trainer_inputs(pairs, policy, callbacks))
    return train_and_finish(trainer, pairs, config, kind="dpo")


def main(argv: list[str] | None = None, callbacks: tuple = ()) -> dict:
    return run(load(METHOD, argv), callbacks=callbacks)
