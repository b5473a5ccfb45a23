"""DeepSpeed for a hand-written loop (ppo), where no Trainer fills the config or joins the ranks.

Each rank uses the GPU of its LOCAL_RANK (gloo on CPU ranks); the user's JSON is checked before
any model loads and its "auto" values are filled as the HF Trainer would; metrics are averaged and
tensors gathered over ranks; under ZeRO-3 the full weights are gathered to save.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch

from ..errors import UserError


def init_distributed(use_deepspeed: bool) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device). Under --deepspeed join the process group
    (nccl on GPUs, gloo on CPU ranks); each rank uses the GPU of its LOCAL_RANK."""
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # also where bitsandbytes puts a 4-bit model
    if not use_deepspeed:
        return 0, 1, device
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def to_device(model, device: torch.device):
    """Move a model to this rank's device; a bitsandbytes 4-bit model is already placed at load."""
    return model if getattr(model, "is_loaded_in_4bit", False) else model.to(device)


def read_deepspeed_config(path: str) -> dict:
    """The user's DeepSpeed JSON, checked before any model is loaded."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"{path}: zero_optimization.stage {stage}: expected 0, 1, 2 or 3")
    if "optimizer" in config or "scheduler" in config:
        raise UserError(f"{path}: drop the optimizer/scheduler block; this loop uses AdamW with a constant --learning_rate")
    return config


def fill_deepspeed_config(config: dict, micro_batch: int, world: int, max_grad_norm: float, dtype, trainable: int,
                          hidden_size: int) -> dict:
    """Replace the HF-style "auto" values (no Trainer does it for us here)."""
    fill = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "train_batch_size": micro_batch * world, "gradient_clipping": max_grad_norm}
    for key, value in fill.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    for key, wanted in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        if config.get(key, {}).get("enabled") == "auto":
            config[key]["enabled"] = dtype == wanted
    zero = config.get("zero_optimization", {})
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size"):
        if zero.get(key) == "auto":
            zero[key] = min(trainable, 500_000_000)  # small models: one bucket
    if zero.get("stage3_param_persistence_threshold") == "auto":
        zero["stage3_param_persistence_threshold"] = 10 * hidden_size  # as the HF Trainer fills it
    return config


def gathered(engine):
    """ZeRO-3: the full parameters on every rank for the duration (saving); otherwise nothing to do."""
    if engine is None or engine.zero_optimization_stage() != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def mean_over_ranks(values: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)  # nccl needs GPU tensors
    dist.all_reduce(t)
    return dict(zip(values, (t / world).tolist()))


def gather_over_ranks(t: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return t
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)
