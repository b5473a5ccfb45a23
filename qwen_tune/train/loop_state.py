"""Checkpoints for a hand-written training loop (PPO): everything needed to continue exactly, without pickles.

`checkpoint-N/` holds `trainable.safetensors` (each module's trainable tensors, e.g. the actor's
LoRA weights and the value head), `optimizer.safetensors` + `optimizer.json` (AdamW's moments and
its hyper-parameters), `rng.safetensors` (CPU and CUDA generator states) and `trainer_state.json`
(the step and whatever else the loop keeps: its log, the KL coefficient). It is marked complete
like every other checkpoint (`train/checkpoints.py`), so `--resume_from_checkpoint auto` finds it.

Under DeepSpeed (several ranks, ZeRO-sharded weights and optimizer) the engine's own checkpoint holds
weights and optimizer (`deepspeed/`, DeepSpeed's format: torch files that DeepSpeed loads itself, as
under the HF Trainer), beside each rank's `rng_rank{R}.safetensors` and the same `trainer_state.json`.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from . import ownership
from .checkpoints import mark_complete, refuse_non_finite, rotate_checkpoints

STATE = "trainer_state.json"


def trainable_tensors(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": p.detach().cpu().contiguous()
            for name, module in modules.items() for key, p in module.named_parameters() if p.requires_grad}


def save_loop_checkpoint(out: str, step: int, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                         state: dict, limit: int | None) -> str:
    """Write `out/checkpoint-{step}`, mark it complete, then rotate to `limit` complete checkpoints."""
    weights = trainable_tensors(modules)
    refuse_non_finite(weights.values(), f"step {step}", out)
    path = os.path.join(out, f"checkpoint-{step}")
    ownership.claim(out, [os.path.basename(path)])
    os.makedirs(path, exist_ok=True)
    save_file(weights, os.path.join(path, "trainable.safetensors"))
    optim = optimizer.state_dict()
    save_file({f"{index}.{key}": value.detach().cpu().contiguous() for index, values in optim["state"].items()
               for key, value in values.items()}, os.path.join(path, "optimizer.safetensors"))
    with open(os.path.join(path, "optimizer.json"), "w") as f:
        json.dump(optim["param_groups"], f)
    save_file(_rng_state(), os.path.join(path, "rng.safetensors"))
    with open(os.path.join(path, STATE), "w") as f:
        json.dump({"step": step, **state}, f)
    mark_complete(path, step)
    rotate_checkpoints(out, limit, keep={path})
    return path


def save_engine_checkpoint(out: str, step: int, engine, state: dict, limit: int | None) -> str:
    """`save_loop_checkpoint` for a DeepSpeed engine; every rank calls it (the engine's save is collective)."""
    import torch.distributed as dist

    path = os.path.join(out, f"checkpoint-{step}")
    local = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]  # ZeRO-3: this rank's shard of each
    refuse_non_finite(local, f"step {step}", out, every_rank=True)
    rank = dist.get_rank()
    if rank == 0:
        ownership.claim(out, [os.path.basename(path)])
    dist.barrier()
    engine.save_checkpoint(path, tag="deepspeed")
    save_file(_rng_state(), os.path.join(path, f"rng_rank{rank}.safetensors"))
    if rank == 0:
        with open(os.path.join(path, STATE), "w") as f:
            json.dump({"step": step, **state}, f)
    dist.barrier()  # every rank's part is written
    if rank == 0:
        mark_complete(path, step)
        rotate_checkpoints(out, limit, keep={path})
    dist.barrier()
    return path


def load_engine_checkpoint(path: str, engine) -> dict:
    """Restore what `save_engine_checkpoint` wrote (same number of ranks); returns the loop's state."""
    import torch.distributed as dist

    rng_file = os.path.join(path, f"rng_rank{dist.get_rank()}.safetensors")
    saved_ranks = len([f for f in os.listdir(path) if f.startswith("rng_rank")]) if os.path.isdir(path) else 0
    if not os.path.isdir(os.path.join(path, "deepspeed")) or saved_ranks != dist.get_world_size():
        raise UserError(f"{path} was not written by ppo under --deepspeed with {dist.get_world_size()} ranks "
                        f"(written by {saved_ranks or 'no'} rank{'' if saved_ranks == 1 else 's'}); ppo resumes with the launch and options of the "
                        f"interrupted run (sft, rm, dpo and grpo resume on another number of ranks)")
    loaded, _ = engine.load_checkpoint(path, tag="deepspeed")
    if loaded is None:
        raise UserError(f"{path}: DeepSpeed could not load its checkpoint")
    _set_rng_state(load_file(rng_file))
    with open(os.path.join(path, STATE)) as f:
        return json.load(f)


def _rng_state() -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def _set_rng_state(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def load_loop_checkpoint(path: str, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> dict:
    """Restore what `save_loop_checkpoint` wrote into the same modules and optimizer; returns the loop's state."""
    weights = load_file(os.path.join(path, "trainable.safetensors"))
    for name, module in modules.items():
        own = {key[len(name) + 1:]: value for key, value in weights.items() if key.startswith(name + ".")}
        expected = {key for key, p in module.named_parameters() if p.requires_grad}
        if set(own) != expected:
            raise UserError(f"{path} was written by a different setup ({name}: {len(own)} tensors saved, "
                            f"{len(expected)} trainable now); resume with the options of the interrupted run")
        with torch.no_grad():
            params = dict(module.named_parameters())
            for key, value in own.items():
                params[key].copy_(value)
    moments = load_file(os.path.join(path, "optimizer.safetensors"))
    with open(os.path.join(path, "optimizer.json")) as f:
        groups = json.load(f)
    state: dict = {}
    for key, value in moments.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    _set_rng_state(load_file(os.path.join(path, "rng.safetensors")))
    with open(os.path.join(path, STATE)) as f:
        return json.load(f)
