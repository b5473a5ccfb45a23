"""Resuming a DeepSpeed run on a different number of ranks, through DeepSpeed's universal checkpoint.

A ZeRO checkpoint holds each rank's slice of the fp32 weights and of Adam's moments, cut for the world that
saved it, and DeepSpeed refuses it on another. Its universal format keeps every parameter whole (weights,
exp_avg, exp_avg_sq), from which any world cuts its own slices. When the world size changed, the checkpoint
is converted once, beside the original (`checkpoint-N/global_stepN_universal`, named by
`checkpoint-N/latest_universal`; its `param_groups.json` is written last), and the engine is told to load
it (`checkpoint.load_universal`). The Trainer's step, scheduler and data position come from the checkpoint
as usual; the data stays in step when the global batch (ranks x per-device batch x accumulation) is kept.

DeepSpeed's ZeRO-3 universal load (0.19) gives every optimizer parameter group the hyperparameters of the
first one, so the Trainer's no-decay group (biases, norms) would get weight decay: `UniversalParamGroups`
puts each group's own back from the checkpoint, before the first step.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from argparse import Namespace

import torch
from transformers import TrainerCallback

from .distributed import is_main_process, log

LATEST, LATEST_UNIVERSAL, PARAM_GROUPS = "latest", "latest_universal", "param_groups.json"


def tag(checkpoint: str, latest: str = LATEST) -> str | None:
    """The DeepSpeed folder of `checkpoint` that its `latest` file names (None: not a DeepSpeed checkpoint)."""
    try:
        with open(os.path.join(checkpoint, latest), encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def saved_world_size(checkpoint: str) -> int | None:
    """How many ranks wrote `checkpoint`'s ZeRO state (None: not a DeepSpeed checkpoint)."""
    folder = tag(checkpoint)
    if folder is None:
        return None
    return len(glob.glob(os.path.join(checkpoint, folder, "*zero_pp_rank_*_optim_states.pt"))) or None


def resume_on_this_world(args, checkpoint: str | None) -> None:
    """Before the Trainer exists: a DeepSpeed checkpoint saved by another number of ranks is converted (main
    rank; the others wait) and loaded as a universal checkpoint."""
    if not checkpoint or getattr(args, "hf_deepspeed_config", None) is None:
        return
    saved, now = saved_world_size(checkpoint), int(os.environ.get("WORLD_SIZE", "1"))
    if saved is None or saved == now:
        return
    log(f"{checkpoint} was saved by {saved} rank{'s' if saved > 1 else ''} and this run has {now}: its ZeRO state "
        f"is loaded through DeepSpeed's universal checkpoint")
    with args.main_process_first(local=False, desc="universal checkpoint"):
        if is_main_process():
            convert_to_universal(checkpoint)
    args.hf_deepspeed_config.config.setdefault("checkpoint", {})["load_universal"] = True


def convert_to_universal(checkpoint: str) -> None:
    """`checkpoint-N/global_stepN_universal` from `checkpoint-N/global_stepN`, once (a cut-short one is redone)."""
    original = tag(checkpoint)
    universal = os.path.join(checkpoint, f"{original}_universal")
    if os.path.isfile(os.path.join(universal, PARAM_GROUPS)):  # written last
        return
    shutil.rmtree(universal, ignore_errors=True)
    from deepspeed.checkpoint import ds_to_universal

    ds_to_universal.main(Namespace(input_folder=os.path.join(checkpoint, original), output_folder=universal,
                                   num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                   inject_missing_state=False))
    # the per-group hyperparameters, as JSON for UniversalParamGroups (the file DeepSpeed just wrote from the
    # checkpoint's scanned pickles holds DeepSpeed objects: it is read here once, as DeepSpeed reads it)
    state = torch.load(os.path.join(universal, "zero", "optimizer_state.pt"), map_location="cpu", weights_only=False)
    groups = [{k: v for k, v in group.items() if k != "params"} for group in state["optimizer_state_dict"]["param_groups"]]
    with open(os.path.join(universal, PARAM_GROUPS), "w", encoding="utf-8") as f:
        json.dump(groups, f, indent=1)
    log(f"wrote {universal} (DeepSpeed's universal checkpoint: every parameter's weights and Adam state, whole)")


def loads_universal(args) -> bool:
    config = getattr(args, "hf_deepspeed_config", None)
    return config is not None and bool(config.config.get("checkpoint", {}).get("load_universal"))


class UniversalParamGroups(TrainerCallback):
    """After a ZeRO-3 universal load: each optimizer parameter group's own hyperparameters (weight decay, lr, betas,
    eps), as the checkpoint saved them."""

    def __init__(self, resume_from: str | None):
        self.resume_from = resume_from

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if not (self.resume_from and loads_universal(args) and args.hf_deepspeed_config.is_zero3()):
            return
        universal = os.path.join(self.resume_from, tag(self.resume_from, LATEST_UNIVERSAL))
        with open(os.path.join(universal, PARAM_GROUPS), encoding="utf-8") as f:
            saved = json.load(f)
        if len(saved) != len(optimizer.param_groups):
            raise RuntimeError(f"{universal}: {len(saved)} optimizer parameter groups saved, {len(optimizer.param_groups)} now")
        for group, own in zip(optimizer.param_groups, saved):
            group.update({key: tuple(value) if isinstance(value, list) else value for key, value in own.items()})
