"""Direct Preference Optimization (`qwen-tune dpo`): the lighter alternative to reward model + PPO.

Reads top to bottom like the job: validate and tokenize the pairs in the run's chat template (prompt =
the rendered conversation up to the reply's body, reply = its body through `<|im_end|>`, exactly the
tokens SFT supervises), load the policy (full, LoRA or Q-LoRA) and the reference (a frozen copy of the
start model; with an adapter, the same model with the adapter disabled, so no second copy), train with
the HF Trainer on the DPO loss, save a plain Hugging Face directory.

The loss is ours, not TRL's DPOTrainer: TRL re-tokenizes every pair with its own chat-template call
(which would train the `\\n` after `<|im_end|>` and turn control tokens typed into text into real ones)
and has no public way to take token ids (huggingface/trl#2368). The formulas are TRL's and the papers':
    logits = beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))
    sigmoid (DPO):  -log sigmoid(logits)      ipo: (logits / beta - 1 / (2 beta))^2      hinge: max(0, 1 - logits)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import Trainer

from ..options import (DataOptions, FormatOptions, ImageOptions, LearningRates, LoraOptions, Method, ModelOptions,
                      TrainingArguments, VisionTrainingOptions, load, prepare_run, set_chat_format, train_dtype)
from ..data.collate import PackedPairCollator, PaddedPairCollator, images_unpacked
from ..data.image_inputs import image_inputs_for
from ..data.pairs import encode_pairs
from ..data.splits import load_splits
from ..errors import UserError
from ..models.lora import add_lora
from ..models.model import load_model, packing_for, resolve_model_path
from ..report import report_callbacks, show_progress_as_lines
from ..models.tokenizer import load_tokenizer
from ..train.distributed import log, print_zero3_partition
from ..train.guards import ObservedSteps, safety_callbacks
from ..train.loss import LossOnlyEvaluation, router_aux_loss_coef, sequence_logprobs, sequence_logprobs_and_aux
from ..train.finish import finish_run, last_logged
from ..train.zero3_pictures import run_vision_tower_on_every_rank

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclass
class DPOTrainingArguments(TrainingArguments):
    """Our training options (the seed's flags and defaults) plus DPO's."""

    beta: float = field(default=0.1, metadata={"help": "Strength of the pull towards the reference model (higher = stay closer)."})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO, Rafailov et al. 2023), ipo (Azar et al. 2023) or hinge (SLiC).",
                                                        "choices": list(LOSS_TYPES)})


METHOD = Method(
    "dpo",
    groups={"model": ModelOptions, "data": DataOptions, "format": FormatOptions, "images": ImageOptions,
            "vision": VisionTrainingOptions, "lora": LoraOptions, "train": DPOTrainingArguments},
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


class DPOLossTrainer(ObservedSteps, LossOnlyEvaluation, Trainer):
    """HF Trainer with the DPO loss on our packed pairs; logs rewards/{chosen,rejected,accuracies,margins} like TRL.
    Where the checkpoint's config asks for it (`output_router_logits`), training adds the policy's MoE router
    load-balancing loss, `router_aux_loss_coef * aux_loss`, and logs `aux_loss`."""

    def __init__(self, *args, reference=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference = reference
        if reference is not None:
            if self.is_deepspeed_enabled:  # ZeRO-3: the frozen reference is sharded like the policy
                from trl.models import prepare_deepspeed

                self.reference = prepare_deepspeed(reference, self.accelerator)
            else:
                self.reference = reference.to(self.args.device)
        self.pair_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.aux_loss_coef = router_aux_loss_coef(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        n_sequences = 2 * len(inputs["sample_ids"])
        policy, aux_loss = sequence_logprobs_and_aux(model, inputs, n_sequences)
        with torch.no_grad():
            if self.reference is None:  # an adapter: the reference is the base with it switched off
                with self.accelerator.unwrap_model(model).disable_adapter():
                    reference = sequence_logprobs(model, inputs, n_sequences)
            else:
                reference = sequence_logprobs(self.reference, inputs, n_sequences)
        loss, chosen, rejected = dpo_loss(policy, reference, self.args.beta, self.args.loss_type)
        metrics = self.pair_metrics["train" if model.training else "eval"]
        gather = self.accelerator.gather_for_metrics
        for name, value in (("rewards/chosen", chosen), ("rewards/rejected", rejected),
                            ("rewards/accuracies", (chosen > rejected).float()), ("rewards/margins", chosen - rejected),
                            ("logps/chosen", policy[: n_sequences // 2].detach()), ("logps/rejected", policy[n_sequences // 2 :].detach())):
            metrics[name].append(gather(value).mean().item())
        loss = loss.mean()
        if model.training and self.aux_loss_coef is not None and aux_loss is not None:  # the MoE router's, as the config asks
            loss = loss + self.aux_loss_coef * aux_loss.to(loss.dtype)
            metrics["aux_loss"].append(gather(aux_loss.detach()[None]).mean().item())
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Add the pair metrics averaged since the last log (in place: `evaluate()` returns this dict)."""
        mode, prefix = ("eval", "eval_") if any(k.startswith("eval_") for k in logs) else ("train", "")
        logs.update({prefix + k: sum(v) / len(v) for k, v in self.pair_metrics[mode].items() if v})
        self.pair_metrics[mode].clear()
        super().log(logs, start_time)


def run(config, callbacks: tuple = ()) -> dict:
    """`callbacks`: extra Trainer callbacks (tests use them to trace batches and inject faults)."""
    prepared = prepare_run(config)
    args, model_options, data, lora = prepared.args, config.model, config.data, config.lora
    model_path = resolve_model_path(model_options.model_name_or_path)
    tokenizer = load_tokenizer(model_path, trust_remote_code=model_options.trust_remote_code)
    images = image_inputs_for(model_path, tokenizer, min_pixels=config.images.min_pixels, max_pixels=config.images.max_pixels)
    fmt = set_chat_format(tokenizer, config.format, source=model_path, images=images)
    log(f"format: {fmt.description}")
    train, train_report, evaluation, eval_report = load_splits(
        data, args.seed, lambda paths: encode_pairs(paths, fmt, data.model_max_length, split_prompt=True, seed=args.seed), log)
    if not len(train):
        raise UserError(f"{data.data_path}: no pair fits within model_max_length={data.model_max_length}")

    load = dict(dtype=train_dtype(args), trust_remote_code=model_options.trust_remote_code,
                attn_implementation=model_options.attn_implementation, allow_pickle_weights=model_options.allow_pickle_weights)
    model = load_model(model_path, q_lora=lora.q_lora, adapter=lora.use_lora, **load, **config.vision.switches())
    model.config.use_cache = False  # packed rows need it off
    print_zero3_partition(model)
    reference = None
    if lora.use_lora:
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
        model = add_lora(model, q_lora=lora.q_lora, gradient_checkpointing=args.gradient_checkpointing, **lora.adapter_options(),
                         **config.vision.switches())
        model.print_trainable_parameters()
    else:
        # all frozen; its load would repeat the policy's lines, and say its vision tower trains nothing
        reference = load_model(model_path, **load, log=lambda _: None).eval().requires_grad_(False)
    run_vision_tower_on_every_rank([model, reference], images, train, evaluation)  # ZeRO-3: ranks gather alike
    trainer = DPOLossTrainer(
        model=model,
        reference=reference,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=PackedPairCollator() if images_unpacked(packing_for(model, True, log), log, train, evaluation)
        else PaddedPairCollator(tokenizer.pad_token_id, images),
        processing_class=tokenizer,
        callbacks=safety_callbacks(args, callbacks, prepared.resume_from) + report_callbacks(args),
    )
    show_progress_as_lines(trainer)
    result = trainer.train(resume_from_checkpoint=prepared.resume_from)
    metrics = dict(result.metrics)
    metrics["train_loss_final"] = last_logged(trainer, "loss")
    if evaluation is not None:
        metrics.update(trainer.evaluate())  # eval_rewards/margins, eval_rewards/accuracies, ...
        log(f"eval: preference accuracy {metrics.get('eval_rewards/accuracies', float('nan')):.3f}, "
            f"reward margin {metrics.get('eval_rewards/margins', float('nan')):.3f}")

    finish_run(trainer, tokenizer=tokenizer, fmt=fmt, data=data, data_reports={"train": train_report, "eval": eval_report},
               metrics=metrics, kind="dpo", model_path=model_path, adapter=lora.use_lora)
    return metrics


def main(argv: list[str] | None = None, callbacks: tuple = ()) -> dict:
    return run(load(METHOD, argv), callbacks=callbacks)
