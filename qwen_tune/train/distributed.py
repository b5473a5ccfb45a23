"""Multi-process training: rank-0 messages, and DDP / DeepSpeed over gloo on CPU ranks without a GPU.

On a GPU machine torchrun and DeepSpeed need nothing from us. On CPU-only ranks (how the test suite
exercises the whole distributed path) accelerate finds no backend: under plain torchrun every rank
then trains alone, unsynchronised, and all of them write the output; under DeepSpeed it counts one
process while DeepSpeed counts the world and fails a batch-size assertion. Creating accelerate's
state ourselves with the gloo backend, before `TrainingArguments` exists, and telling the Trainer to
use that state, fixes both.
"""

from __future__ import annotations

import os

from ..console import say


def is_main_process() -> bool:
    """Rank 0 of a torchrun/deepspeed launch, or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def log(message: str) -> None:
    """A progress or summary line on stderr (on a line of its own), once per run rather than once per rank."""
    if is_main_process():
        say(message)


def prepare_cpu_ranks(deepspeed: bool) -> bool:
    """Set up gloo-backed ranks (DDP, or DeepSpeed when `--deepspeed` is asked for) on a machine without CUDA."""
    if not deepspeed and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch

    if torch.cuda.is_available():
        return False
    if deepspeed:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    from accelerate import PartialState

    PartialState(backend="gloo")
    return True


def print_zero3_partition(model, label: str = "") -> None:
    """Under ZeRO-3, every rank prints 'rank R holds N of M parameter values': shows sharding really happened.
    `label`: which model, where a run shards more than the one it trains (distill's teacher)."""
    params = list(model.parameters())
    if not params or not hasattr(params[0], "ds_numel"):
        return
    local = sum(p.ds_tensor.numel() for p in params)
    full = sum(p.ds_numel for p in params)
    rank = int(os.environ.get("RANK", "0"))
    say(f"ZeRO-3{f' ({label})' if label else ''}: rank {rank} holds {local:,} of {full:,} parameter values")


def finish() -> None:
    """End a multi-process run cleanly: wait for every rank, then leave without interpreter teardown.

    Under ZeRO-3 on CPU the non-writing rank sometimes aborted during teardown, and the launcher
    then killed rank 0 in the middle of writing the model; a barrier and a direct exit prevent it.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
