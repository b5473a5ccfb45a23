"""Supervised fine-tuning: full-parameter, LoRA or Q-LoRA, on conversations in the served format (chat_format).

Reads top to bottom like the job: check the options, validate and tokenize the data (before any
model is loaded), load the model, train with the HF Trainer (DeepSpeed, checkpoints and logging
come from it), save a standard Hugging Face directory and say how to load it.
"""

from __future__ import annotations

import math

import torch
from transformers import Trainer

from ..options import (CacheOptions, DataOptions, FormatOptions, ImageOptions, LayoutOptions, LearningRates, LoraOptions,
                       Method, ModelOptions, TrainingArguments, VisionTrainingOptions, load, prepare_run, set_chat_format,
                       train_dtype)
from ..options.training import SEED_LR_FULL, SEED_LR_LORA
from ..data.collate import PackedCollator, PaddedCollator, images_unpacked
from ..data.cache import load_tokens
from ..data.image_inputs import image_inputs_for
from ..data.splits import load_splits
from ..errors import UserError
from ..models.lora import add_lora
from ..models.model import load_model, packing_for, resolve_model_path
from ..report import report_callbacks, show_progress_as_lines
from ..models.tokenizer import load_tokenizer
from ..train.distributed import log, print_zero3_partition
from ..train.guards import ObservedSteps, safety_callbacks
from ..train.loss import LossOnlyEvaluation, causal_lm_loss_terms, router_aux_loss_coef
from ..train.zero3_pictures import run_vision_tower_on_every_rank
from ..train.finish import finish_run, last_logged


class SFTLossTrainer(ObservedSteps, LossOnlyEvaluation, Trainer):
    """HF Trainer whose loss is the mean over the supervised tokens of the whole optimizer step.

    The Trainer counts the step's supervised tokens across micro-batches and ranks
    (`num_items_in_batch`), so 4 x 1 accumulation gives the same update as one batch of 4.
    Where the checkpoint's config asks for it (`output_router_logits`), training adds the MoE router's
    load-balancing loss, `router_aux_loss_coef * aux_loss`, and logs `aux_loss` beside `loss`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True  # count num_items_in_batch for our own loss
        self.aux_loss_coef = router_aux_loss_coef(self.model)
        self.aux_losses: list[torch.Tensor] = []  # since the last log line

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss_sum, n, aux_loss = causal_lm_loss_terms(model, inputs)
        if num_items_in_batch is None:  # evaluation: this batch alone, the language-model loss only
            loss = loss_sum / max(n, 1)
        else:
            if self.aux_loss_coef is not None and aux_loss is not None:
                loss_sum = loss_sum + router_loss_share(aux_loss, self.aux_loss_coef, n)
                self.aux_losses.append(aux_loss.detach())
            loss = loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP/DeepSpeed average gradients over ranks
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Add `aux_loss`, the router's load-balancing loss averaged since the last log line (unweighted; `loss` holds
        it times router_aux_loss_coef), and to an evaluation its perplexity (in place: `evaluate()` returns this dict)."""
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 700.0))  # as `qwen-tune eval` reports it
        if self.aux_losses and "loss" in logs:
            logs["aux_loss"] = self.accelerator.gather_for_metrics(torch.stack(self.aux_losses).mean()[None]).mean().item()
            self.aux_losses.clear()
        super().log(logs, start_time)


def router_loss_share(aux_loss: torch.Tensor, coef: float, n: int) -> torch.Tensor:
    """The router loss as a sum over this micro-batch's n supervised tokens (coef * aux_loss each): divided by the
    step's token count like the cross-entropy sum, one batch gives loss + coef * aux_loss, and accumulated
    micro-batches (and ranks) their token-weighted mean, not coef * aux_loss once per micro-batch."""
    return coef * aux_loss.to(torch.float32) * n


def resolve_layout(values: dict[str, dict]) -> None:
    """SFT's layout choices: the seed's pad-to-max turns packing off; unpacked batches group by length (dynamic
    padding wastes little when lengths are alike)."""
    layout, train = values["layout"], values["train"]
    if layout["pad_to_max_length"]:
        layout["packing"] = False  # the seed's layout was asked for explicitly
    if train["train_sampling_strategy"] == "auto":
        train["train_sampling_strategy"] = "group_by_length" if not layout["packing"] and not layout["pad_to_max_length"] else "random"


METHOD = Method(
    "sft",
    groups={"model": ModelOptions, "data": DataOptions, "format": FormatOptions, "images": ImageOptions,
            "vision": VisionTrainingOptions, "layout": LayoutOptions, "cache": CacheOptions, "lora": LoraOptions,
            "train": TrainingArguments},
    learning_rates=LearningRates(full=SEED_LR_FULL, lora=SEED_LR_LORA),  # the seed's
    resolve=resolve_layout,
)


def collator_for(layout: LayoutOptions, max_length: int, pad_token_id: int, packing: bool, images=None):
    """`packing`: `--packing` as the model and data can honour it (model.packing_for, collate.images_unpacked); `images`:
    the run's ImageInputs, for data with images."""
    if layout.pad_to_max_length:
        return PaddedCollator(pad_token_id, pad_to=max_length, images=images)
    if packing:
        return PackedCollator()
    return PaddedCollator(pad_token_id, images=images)


def run(config, callbacks: tuple = ()) -> dict:
    """`callbacks`: extra Trainer callbacks (tests use them to trace batches and inject faults)."""
    prepared = prepare_run(config)
    args, model_options, data, lora = prepared.args, config.model, config.data, config.lora
    model_path = resolve_model_path(model_options.model_name_or_path)
    if config.layout.lazy_preprocess:
        log("--lazy_preprocess: accepted for the seed's scripts; the data is always tokenized once and memory-mapped")

    tokenizer = load_tokenizer(model_path, trust_remote_code=model_options.trust_remote_code)
    images = image_inputs_for(model_path, tokenizer, min_pixels=config.images.min_pixels, max_pixels=config.images.max_pixels)
    fmt = set_chat_format(tokenizer, config.format, source=model_path, images=images)
    log(f"format: {fmt.description}")
    def load(paths):
        return load_tokens(paths, fmt, data.model_max_length, seed=args.seed, options=config.cache)

    with args.main_process_first(local=True, desc="tokenizing the data"):  # one rank per node tokenizes, the others map its cache
        train_samples, train_report, eval_samples, eval_report = load_splits(data, args.seed, load, log)
    if not train_samples:
        raise UserError(f"{data.data_path}: no sample has a supervised token left within model_max_length={data.model_max_length}")

    model = load_model(model_path, dtype=train_dtype(args), q_lora=lora.q_lora,
                       trust_remote_code=model_options.trust_remote_code, attn_implementation=model_options.attn_implementation,
                       allow_pickle_weights=model_options.allow_pickle_weights, adapter=lora.use_lora,
                       **config.vision.switches())
    model.config.use_cache = False  # packed rows need it off, and training never uses the cache
    print_zero3_partition(model)
    if args.gradient_checkpointing:
        model.enable_input_require_grads()
    if lora.use_lora:
        model = add_lora(model, q_lora=lora.q_lora, gradient_checkpointing=args.gradient_checkpointing, **lora.adapter_options(),
                         **config.vision.switches())
        model.print_trainable_parameters()

    packing = images_unpacked(packing_for(model, config.layout.packing, log), log, train_samples, eval_samples)
    run_vision_tower_on_every_rank([model], images, train_samples, eval_samples)  # ZeRO-3: ranks gather alike
    trainer = SFTLossTrainer(
        model=model,
        args=args,
        train_dataset=train_samples,  # memory-mapped datasets.Dataset: the Trainer reads its `length` column to group by length
        eval_dataset=eval_samples if eval_samples else None,
        data_collator=collator_for(config.layout, data.model_max_length, tokenizer.pad_token_id, packing, images),
        processing_class=tokenizer,
        callbacks=safety_callbacks(args, callbacks, prepared.resume_from) + report_callbacks(args),
    )
    show_progress_as_lines(trainer)
    result = trainer.train(resume_from_checkpoint=prepared.resume_from)
    metrics = dict(result.metrics)
    metrics["train_real_tokens_per_second"] = round(trainer.state.num_input_tokens_seen / max(metrics["train_runtime"], 1e-9), 1)
    metrics["train_loss_final"] = last_logged(trainer, "loss")
    if eval_samples:
        metrics.update(trainer.evaluate())

    finish_run(trainer, tokenizer=tokenizer, fmt=fmt, data=data, data_reports={"train": train_report, "eval": eval_report},
               metrics=metrics, kind="sft", model_path=model_path, adapter=lora.use_lora)
    return metrics


def main(argv: list[str] | None = None, callbacks: tuple = ()) -> dict:
    return run(load(METHOD, argv), callbacks=callbacks)
