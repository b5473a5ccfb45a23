"""Checkpoints every trainer can trust: a completion marker, no pickled arguments, rotation of complete ones only.

The HF Trainer writes `checkpoint-N` in place; `CheckpointSafety.on_save` (a public callback hook,
run after every rank has written its part) flushes it to disk, replaces the pickled
`training_args.bin` with `training_args.json`, writes `checkpoint_complete.json` last and only then
rotates. A checkpoint without the marker was cut short: resume ignores it, and rotation never
counts it, so the newest complete checkpoint always survives a kill at any moment.

Rotation is ours (the Trainer's would delete the previous checkpoint before the new one is marked):
`--save_total_limit` is read here and the Trainer is given none (see `TrainingArguments`).

Resuming relies on the HF Trainer, which restores model, optimizer, scheduler, RNG states and the
position in the data order; transformers 5.23 loads the optimizer/scheduler/RNG files with
`torch.load(weights_only=True)`, so no arbitrary pickle is executed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import torch
from transformers import TrainerCallback

from ..errors import UserError
from . import ownership

COMPLETE = "checkpoint_complete.json"  # written last, after every file of the checkpoint is on disk
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class NonFiniteError(UserError):
    """A step's loss, gradient or weights were NaN/Inf: stop before anything spoiled is saved."""


def checkpoints(output_dir: str) -> list[tuple[int, str, bool]]:
    """(step, path, complete) of every `checkpoint-N` directory qwen-tune wrote, oldest step first. A user's own
    `checkpoint-N` is none of them: never resumed from, rotated or removed."""
    found = []
    if os.path.isdir(output_dir):
        mine = ownership.ours(output_dir)
        for name in os.listdir(output_dir):
            m = CHECKPOINT_RE.match(name)
            path = os.path.join(output_dir, name)
            if m and os.path.isdir(path) and name in mine:
                found.append((int(m.group(1)), path, os.path.isfile(os.path.join(path, COMPLETE))))
    return sorted(found)


def remove_checkpoints(output_dir: str, keep: str | None = None) -> int:
    """After a successful run: its `checkpoint-N` directories (each about 3x the model with AdamW) go, all but `keep`
    (the best one); returns how many went."""
    found = [c for c in checkpoints(output_dir) if keep is None or not os.path.samefile(c[1], keep)]
    for _, path, _ in found:
        shutil.rmtree(path)
    ownership.forget(output_dir, [os.path.basename(path) for _, path, _ in found])
    return len(found)


def latest_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint that was completely written (has the completion marker)."""
    complete = [path for _, path, ok in checkpoints(output_dir) if ok]
    return complete[-1] if complete else None


def rotate_checkpoints(run_dir: str, limit: int | None, keep: set) -> None:
    """Delete the oldest complete checkpoints beyond `limit`; never one in `keep`, never an incomplete one."""
    if not limit or limit <= 0:
        return
    complete = [path for _, path, ok in checkpoints(run_dir) if ok]
    excess = len(complete) - max(limit, len(keep & set(complete)))
    for path in complete:
        if excess <= 0:
            break
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
            ownership.forget(run_dir, [os.path.basename(path)])
            excess -= 1


def refuse_non_finite(tensors, when: str, run_dir: str, every_rank: bool = False) -> None:
    """Weights holding NaN/Inf are never saved over good ones: one message for every save (Trainer checkpoints, the
    final model, ppo's loop and DeepSpeed engine). `every_rank`: each rank checks its shard, and all refuse together."""
    finite = all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point() and t.numel())
    if every_rank:
        import torch.distributed as dist

        flag = torch.tensor([float(finite)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = flag.item() == 1
    if not finite:
        raise NonFiniteError(f"{when}: the weights hold NaN/Inf; refusing to save them. The last complete checkpoint is "
                             f"{latest_complete_checkpoint(run_dir) or 'none'}")


def write_arguments_as_json(directory: str, args) -> None:
    """The Trainer pickles its arguments (`training_args.bin`); keep them as JSON instead."""
    pickle = os.path.join(directory, "training_args.bin")
    if os.path.exists(pickle):
        os.remove(pickle)
    values = json.loads(args.to_json_string())
    values["save_total_limit"] = getattr(args, "checkpoint_limit", values.get("save_total_limit"))  # what was asked
    with open(os.path.join(directory, "training_args.json"), "w") as f:
        json.dump(values, f, indent=2)


def mark_complete(path: str, step: int) -> None:
    """Flush every file of the checkpoint to disk, then write the marker (power loss, not just kills)."""
    for root, _, files in os.walk(path):
        for name in files:
            ownership.fsync(os.path.join(root, name))
        ownership.fsync(root)
    with open(os.path.join(path, COMPLETE), "w") as f:
        json.dump({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
        f.flush()
        os.fsync(f.fileno())
    ownership.fsync(path)


def _wait_for_every_rank() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class CheckpointSafety(TrainerCallback):
    """Refuse to save non-finite weights; mark each finished checkpoint complete; rotate complete ones."""

    def __init__(self, save_total_limit: int | None):
        self.save_total_limit = save_total_limit

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.claim_next_checkpoint(args, state, control)
        if control.should_save and model is not None:
            refuse_non_finite(model.parameters(), f"step {state.global_step}", args.output_dir)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.claim_next_checkpoint(args, state, control)

    @staticmethod
    def claim_next_checkpoint(args, state, control) -> None:
        """The Trainer saves right after this event: its directory is ours before its first byte."""
        if control.should_save and args.should_save:
            ownership.claim(args.output_dir, [f"checkpoint-{state.global_step}"])

    def on_save(self, args, state, control, **kwargs):
        _wait_for_every_rank()  # under DeepSpeed every rank writes its own optimizer shard
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if args.should_save and os.path.isdir(path):
            write_arguments_as_json(path, args)
            mark_complete(path, state.global_step)
            rotate_checkpoints(args.output_dir, self.save_total_limit, keep={path, state.best_model_checkpoint})
        _wait_for_every_rank()


def save_final_model(trainer, output_dir: str) -> None:
    """The trained weights as safetensors (refused when non-finite) with the arguments as JSON."""
    refuse_non_finite(trainer.model.parameters(), f"the end of training ({output_dir})", trainer.args.output_dir)
    trainer.save_model(output_dir)
    if trainer.args.should_save:
        write_arguments_as_json(output_dir, trainer.args)
