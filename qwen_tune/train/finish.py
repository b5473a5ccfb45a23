"""The end of every run, the same for each method: weights, tokenizer + template, metrics, card, how to load.

The output directory is a plain Hugging Face directory (safetensors, or a PEFT adapter that records an
absolute base path), with `train_metrics.json`, `training_args.json`, the loss plot and a model card.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from transformers import Trainer

from ..models.trained import loading_code
from ..models.model import is_vision_language
from ..models.tokenizer import save_tokenizer
from ..report import card_path, write_run_report
from . import ownership
from .checkpoints import remove_checkpoints, save_final_model
from .distributed import log


def last_logged(trainer: Trainer, key: str):
    values = [h[key] for h in trainer.state.log_history if key in h]
    return values[-1] if values else None


def finish_run(trainer: Trainer, *, tokenizer, fmt, data, data_reports: dict, metrics: dict, kind: str,
               model_path: str, adapter: bool, reward_model: bool = False) -> None:
    """Save what `trainer` trained into its output directory and print how to load it.
    `fmt`: the run's ChatFormat; `data`: the run's DataOptions, where the data came from (for the card)."""
    out = trainer.args.output_dir
    data_reports = {name: report for name, report in data_reports.items() if report is not None}
    card = card_path(out) if trainer.is_world_process_zero() else None
    staged = ownership.staging_dir(out)  # the weights and tokenizer go here first, then move in (ownership.py)
    save_final_model(trainer, staged)
    if not trainer.is_world_process_zero():
        return
    save_tokenizer(tokenizer, staged)  # carries the chat template the run trained with
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    if fmt.images is not None:
        fmt.images.processor.save_pretrained(staged)  # sizes images as the run did
    elif is_vision_language(model.config):
        copy_processor_files(model_path, staged)  # trained on text, it still reads images as the checkpoint did
    if not reward_model:
        model.generation_config.save_pretrained(staged)  # stops at <|im_end|>
    publish(out, card, also=("train_metrics.json",))
    best = best_checkpoint(trainer)
    if best is not None:
        metrics = {**metrics, **best.metrics}
    reports = {name: report.__dict__ for name, report in data_reports.items()}
    with open(os.path.join(out, "train_metrics.json"), "w") as f:
        json.dump({**metrics, "data": reports}, f, indent=2, default=str)
    vision_language = is_vision_language(model.config)
    write_run_report(out, trainer=trainer, metrics=metrics, model_path=model_path, kind=kind, chat_format=fmt.description,
                     card=card, adapter=adapter, vision_language=vision_language, reward_model=reward_model,
                     data_files={"train": data.data_path, "eval": data.eval_data_path}, data_reports=data_reports)
    ownership.mark_finished(out, {"method": kind, "adapter": adapter})
    log(how_to_load(out, adapter, reward_model=reward_model, vision_language=vision_language,
                    best=best.summary if best is not None else None))
    clean_up_checkpoints(out, trainer.args.keep_checkpoints, keep=best.kept if best is not None else None)


PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")


def copy_processor_files(model_path: str, staged: str) -> None:
    import shutil

    for name in PROCESSOR_FILES:
        if os.path.isfile(os.path.join(model_path, name)):
            shutil.copy2(os.path.join(model_path, name), os.path.join(staged, name))


def publish(out: str, card: str, also: tuple[str, ...] = ()) -> None:
    """Move the staged result in; the report files (`also`, the card, the plot) are written next, directly.
    PEFT's save writes a template README.md: the card replaces it."""
    template = os.path.join(ownership.staging_dir(out), "README.md")
    if os.path.exists(template):
        os.remove(template)
    ownership.publish(out, also=(*also, os.path.basename(card), "loss.png", "loss.json"))


def clean_up_checkpoints(out: str, keep_all: bool, keep: str | None = None) -> None:
    """The run finished and its result is saved: its checkpoints are no longer needed to resume. `keep`: the best one."""
    if not keep_all and (n := remove_checkpoints(out, keep=keep)):
        besides = f" besides the best, {os.path.basename(keep)}" if keep else ""
        log(f"removed the run's {n} checkpoint director{'y' if n == 1 else 'ies'}{besides} "
            f"(--keep_checkpoints True keeps them{' all' if keep else ''})")


@dataclass
class Best:
    """The best evaluation during training: a line for the run's summary, metrics for the card, the checkpoint to keep."""

    summary: str
    metrics: dict
    kept: str | None = None


def best_checkpoint(trainer: Trainer) -> Best | None:
    """Which step evaluated best by --metric_for_best_model (the Trainer tracks it), and where that model is now."""
    state, args = trainer.state, trainer.args
    if not args.metric_for_best_model or state.best_global_step is None or state.best_metric is None:
        return None  # no evaluation during training
    name = args.metric_for_best_model if args.metric_for_best_model.startswith("eval_") else f"eval_{args.metric_for_best_model}"
    step, value = state.best_global_step, state.best_metric
    metrics = {f"best_{name}": value, "best_step": step}
    said = f"Best {name}: {value:.4g}, at step {step}"
    if step == state.global_step:
        return Best(f"{said}, the last one: the saved model", metrics)
    if args.load_best_model_at_end and state.best_model_checkpoint:
        return Best(f"{said}: the saved model (--load_best_model_at_end)", metrics)
    path = state.best_model_checkpoint
    if path and os.path.isdir(path):
        return Best(f"{said}: {os.path.abspath(path)} (kept; the saved model is step {state.global_step}'s)",
                    {**metrics, "best_checkpoint": os.path.abspath(path)}, kept=path)
    return Best(f"{said}; no checkpoint was saved at that step (--save_steps equal to --eval_steps keeps it)", metrics)


def how_to_load(out: str, adapter: bool, reward_model: bool = False, vision_language: bool = False,
                best: str | None = None) -> str:
    """The lines printed at the end of a run: where the result is, the best evaluation (`best`), the class that loads
    it, what to do next."""
    out = os.path.abspath(out)
    code = loading_code(out, adapter=adapter, reward_model=reward_model, vision_language=vision_language)
    then = (f"Score data with:  qwen-tune score --model {out} --data PAIRS.jsonl --out scores.jsonl\n" if reward_model
            else f"Chat with it:  qwen-tune chat --model {out}\n")
    return (
        f"\nSaved {'the reward model ' if reward_model else ''}to {out}\n"
        + (f"{best}\n" if best else "")
        + "Load it with:\n"
        + "".join(f"  {line}\n" for line in code if line)
        + then
    )
