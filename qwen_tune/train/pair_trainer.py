"""What the preference methods that train a policy share (dpo, orpo, simpo on pairs; kto on unpaired replies), all but
their loss.

Pairs are tokenized in the run's chat template (prompt = the rendered conversation up to the reply's body, reply = its
body through `<|im_end|>`, exactly the tokens SFT supervises), packed padding-free (or padded where a model's layers
cannot keep packed sequences apart), the policy is loaded full, LoRA or Q-LoRA, and an HF Trainer whose loss is the
method's per-pair formula trains it with every run's safety (checkpoints, resume, NaN stop, SIGTERM) and ends in a
plain Hugging Face directory. A method then reads like its algorithm:

    pairs = load_pairs(config)
    trainer = MyLossTrainer(**trainer_inputs(pairs, load_policy(pairs, config.lora, config.vision), callbacks))
    return train_and_finish(trainer, pairs, config, kind="my-method")

Unpaired replies (kto) go the same way: `load_pairs(config, encode_unpaired)`, and `collator=UnpairedCollator`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import partial

import torch
from transformers import Trainer

from ..data.collate import images_unpacked, pair_collator
from ..data.image_inputs import image_inputs_for
from ..data.pairs import encode_pairs
from ..data.splits import load_splits
from ..errors import UserError
from ..models.lora import add_lora
from ..models.model import load_model, packing_for, resolve_model_path
from ..models.tokenizer import load_tokenizer
from ..options import (DataOptions, FormatOptions, ImageOptions, LoraOptions, ModelOptions, VisionTrainingOptions, prepare_run,
                       set_chat_format, train_dtype)
from ..report import report_callbacks, show_progress_as_lines
from .distributed import log, print_zero3_partition
from .finish import finish_run, last_logged
from .guards import ObservedSteps, safety_callbacks
from .loss import LossOnlyEvaluation, SequenceLogprobs, router_aux_loss_coef, sequence_logprob_terms, sequence_logprobs
from .zero3_pictures import run_vision_tower_on_every_rank


# the option groups of a method that trains a policy on preference data, besides its own training arguments ("train")
POLICY_OPTION_GROUPS = {"model": ModelOptions, "data": DataOptions, "format": FormatOptions, "images": ImageOptions,
                        "vision": VisionTrainingOptions, "lora": LoraOptions}


@dataclass(frozen=True)
class PairRun:
    """A preference run once its options are acted on: where it starts from and its encoded pairs."""

    prepared: object  # options.PreparedRun: the Trainer's arguments and the checkpoint to resume from
    model_path: str
    load_options: dict  # how the start model loads: dtype, trust_remote_code, attention, pickles
    tokenizer: object
    images: object  # data.image_inputs.ImageInputs of a vision-language checkpoint, else None
    fmt: object  # data.chat_format.ChatFormat
    train: object
    evaluation: object
    reports: dict  # {"train": EncodeReport, "eval": EncodeReport or None}


def load_pairs(config, encode=partial(encode_pairs, split_prompt=True)) -> PairRun:
    """prepare_run, the tokenizer and chat format, and the train / eval pairs (`encode`: data.unpaired.encode_unpaired
    for unpaired replies), validated and tokenized."""
    prepared = prepare_run(config)
    args, model_options, data = prepared.args, config.model, config.data
    model_path = resolve_model_path(model_options.model_name_or_path)
    tokenizer = load_tokenizer(model_path, trust_remote_code=model_options.trust_remote_code)
    images = image_inputs_for(model_path, tokenizer, min_pixels=config.images.min_pixels, max_pixels=config.images.max_pixels)
    fmt = set_chat_format(tokenizer, config.format, source=model_path, images=images)
    log(f"format: {fmt.description}")
    train, train_report, evaluation, eval_report = load_splits(
        data, args.seed, lambda paths: encode(paths, fmt, data.model_max_length, seed=args.seed), log)
    if not len(train):
        raise UserError(f"{data.data_path}: no sample fits within model_max_length={data.model_max_length}")
    load_options = dict(dtype=train_dtype(args), trust_remote_code=model_options.trust_remote_code,
                        attn_implementation=model_options.attn_implementation,
                        allow_pickle_weights=model_options.allow_pickle_weights)
    return PairRun(prepared, model_path, load_options, tokenizer, images, fmt, train, evaluation,
                   {"train": train_report, "eval": eval_report})


def load_policy(run: PairRun, lora, vision):
    """The model to train: the start model in full, or with a LoRA adapter on it (Q-LoRA: on its 4-bit weights);
    `vision`: the VisionTrainingOptions (which parts of a vision tower train)."""
    model = load_model(run.model_path, q_lora=lora.q_lora, adapter=lora.use_lora, **run.load_options, **vision.switches())
    model.config.use_cache = False  # packed rows need it off
    print_zero3_partition(model)
    if lora.use_lora:
        if run.prepared.args.gradient_checkpointing:
            model.enable_input_require_grads()
        model = add_lora(model, q_lora=lora.q_lora, gradient_checkpointing=run.prepared.args.gradient_checkpointing,
                         **lora.adapter_options(), **vision.switches())
        model.print_trainable_parameters()
    run_vision_tower_on_every_rank([model], run.images, run.train, run.evaluation)  # ZeRO-3: ranks gather alike
    return model


def load_frozen_start_model(run: PairRun):
    """A second, frozen copy of the start model (DPO's reference in full fine-tuning)."""
    # all frozen; its load would repeat the policy's lines, and say its vision tower trains nothing
    model = load_model(run.model_path, **run.load_options, log=lambda _: None).eval().requires_grad_(False)
    run_vision_tower_on_every_rank([model], run.images, run.train, run.evaluation)  # ZeRO-3: ranks gather alike
    return model


def trainer_inputs(run: PairRun, model, callbacks: tuple = (), collator=pair_collator) -> dict:
    """A PairLossTrainer's arguments: the samples packed where the model allows it (`collator(packed, pad_token_id,
    images)` makes the batches), every run's safety callbacks."""
    args = run.prepared.args
    packed = images_unpacked(packing_for(model, True, log), log, run.train, run.evaluation)
    return dict(model=model, args=args, train_dataset=run.train, eval_dataset=run.evaluation,
                data_collator=collator(packed, run.tokenizer.pad_token_id, run.images),
                processing_class=run.tokenizer,
                callbacks=safety_callbacks(args, callbacks, run.prepared.resume_from) + report_callbacks(args))


def train_and_finish(trainer: Trainer, run: PairRun, config, kind: str) -> dict:
    """Train (resuming where asked), evaluate on the eval pairs if any, save the result; the run's metrics."""
    show_progress_as_lines(trainer)
    result = trainer.train(resume_from_checkpoint=run.prepared.resume_from)
    metrics = dict(result.metrics)
    metrics["train_loss_final"] = last_logged(trainer, "loss")
    if run.evaluation is not None:
        metrics.update(trainer.evaluate())  # eval_rewards/margins, eval_rewards/accuracies, ...
        shown = {"preference accuracy": "eval_rewards/accuracies", "reward margin": "eval_rewards/margins"}
        log("eval: " + ", ".join(f"{label} {metrics[key]:.3f}" for label, key in shown.items() if key in metrics))
    finish_run(trainer, tokenizer=run.tokenizer, fmt=run.fmt, data=config.data, data_reports=run.reports,
               metrics=metrics, kind=kind, model_path=run.model_path, adapter=config.lora.use_lora)
    return metrics


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's rewards/* of a batch of pairs, from each side's (implicit) reward."""
    return {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/accuracies": (chosen > rejected).float(),
            "rewards/margins": chosen - rejected}


class MetricsSinceLastLog:
    """A Trainer mixin: `record_metrics` collects a loss's metrics, and every log adds each one's mean over its values
    since the last log (`eval_` in front in evaluation), from every rank's sum and count, so a metric with no values in
    a batch (KTO's undesirable rewards in a batch of desirable replies only) counts nothing."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logged_metrics = {"train": defaultdict(lambda: [0.0, 0]), "eval": defaultdict(lambda: [0.0, 0])}

    def record_metrics(self, metrics: dict[str, torch.Tensor], training: bool) -> None:
        """{metric name: per-sample values or a scalar} of one batch (on every rank: this gathers)."""
        logged = self.logged_metrics["train" if training else "eval"]
        for name, value in metrics.items():
            value = value.detach().float().reshape(-1)
            total, count = self.accelerator.gather(torch.stack([value.sum(), value.new_tensor(value.numel())])).reshape(-1, 2).sum(0)
            logged[name][0] += total.item()
            logged[name][1] += int(count.item())

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Add the metrics averaged since the last log (in place: `evaluate()` returns this dict)."""
        mode, prefix = ("eval", "eval_") if any(k.startswith("eval_") for k in logs) else ("train", "")
        logs.update({prefix + name: value for name, value in self.averaged(mode).items()})
        self.logged_metrics[mode].clear()
        super().log(logs, start_time)

    def averaged(self, mode: str) -> dict[str, float]:
        """Each metric's mean over its values since the last log ("train" or "eval")."""
        return {name: total / count for name, (total, count) in self.logged_metrics[mode].items() if count}


class PairLossTrainer(MetricsSinceLastLog, ObservedSteps, LossOnlyEvaluation, Trainer):
    """HF Trainer on packed preference pairs (every chosen sequence, then every rejected one: data/collate.py).

    A method's subclass gives `pair_loss`: its formula, from the policy's per-sequence log-probs (sums and token
    counts) of one forward. This logs the metrics it returns (MetricsSinceLastLog) and, where the checkpoint's config
    asks for it (`output_router_logits`), adds the MoE router's load-balancing loss `router_aux_loss_coef * aux_loss`
    and logs `aux_loss`."""

    SEQUENCES_PER_SAMPLE = 2  # a pair's chosen and rejected sequence (kto: 1, its reply)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.aux_loss_coef = router_aux_loss_coef(self.model)

    def pair_loss(self, model, inputs: dict, policy: SequenceLogprobs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the batch's loss, {metric name: per-sample values or a scalar}); `policy` is laid out [chosen..., rejected...]."""
        raise NotImplementedError

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy = sequence_logprob_terms(model, inputs, self.SEQUENCES_PER_SAMPLE * len(inputs["sample_ids"]))
        loss, metrics = self.pair_loss(model, inputs, policy)
        if model.training and self.aux_loss_coef is not None and policy.aux_loss is not None:  # the MoE router's, as the config asks
            loss = loss + self.aux_loss_coef * policy.aux_loss.to(loss.dtype)
            metrics["aux_loss"] = policy.aux_loss
        self.record_metrics(metrics, model.training)
        return (loss, None) if return_outputs else loss


class FrozenReference:
    """A PairLossTrainer mixin for methods that measure the policy against the start model (dpo, kto): a frozen copy
    (`reference`, sharded like the policy under ZeRO-3), or with a LoRA adapter (`reference=None`) the same model with
    the adapter switched off, so no second copy."""

    def __init__(self, *args, reference=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference = reference
        if reference is not None:
            if self.is_deepspeed_enabled:  # ZeRO-3: the frozen reference is sharded like the policy
                from trl.models import prepare_deepspeed

                self.reference = prepare_deepspeed(reference, self.accelerator)
            else:
                self.reference = reference.to(self.args.device)

    def reference_logprobs(self, model, inputs: dict, n_sequences: int) -> torch.Tensor:
        """The reference's summed log-probs of the batch's sequences (no gradient)."""
        with torch.no_grad():
            if self.reference is None:  # an adapter: the reference is the base with it switched off
                with self.accelerator.unwrap_model(model).disable_adapter():
                    return sequence_logprobs(model, inputs, n_sequences)
            return sequence_logprobs(self.reference, inputs, n_sequences)
