"""The first line of every method's `run`: act on the resolved options once, before data or models are loaded.

The allocator (CPU training), the process group of several CPU ranks, bitsandbytes for --q_lora, the output
directory (refused if a run would lose work or touch the user's files; locked for this run), the checkpoint to
resume from, transformers' TrainingArguments for the Trainer, and the seed. Nothing here changes the config.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, fields

from ..errors import UserError
from .method import TRAIN


@dataclass(frozen=True)
class PreparedRun:
    resume_from: str | None  # the checkpoint this run continues from (--resume_from_checkpoint resolved), or None
    args: object = None  # the Trainer's TrainingArguments (a TRL config), built from the options; None for ppo's own loop


def prepare_run(config) -> PreparedRun:
    import torch
    from transformers import set_seed

    from ..train.cpu_memory import reuse_freed_memory
    from ..train.distributed import log, prepare_cpu_ranks
    from ..train.output_dir import prepare_output_dir
    from ..train.reshard import resume_on_this_world

    method = type(config).method
    group = getattr(config, method.run_group)
    value = group.__getitem__ if isinstance(group, Mapping) else lambda name: getattr(group, name)
    if not torch.cuda.is_available():
        reuse_freed_memory()  # a training run on the CPU: steps reuse freed pages (train/cpu_memory.py)
    lora = getattr(config, "lora", None)
    if lora is not None and lora.q_lora and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--q_lora needs bitsandbytes: pip install bitsandbytes")
    trainer = method.trainer_arguments is not None
    own_ranks = trainer and prepare_cpu_ranks(bool(value("deepspeed")))  # before TrainingArguments, which uses them
    for note in config.notes:
        log(note)
    resume = prepare_output_dir(value("output_dir"), value("overwrite_output_dir"), value("resume_from_checkpoint"))
    args = None
    if trainer:
        args = trainer_arguments(config, resume, own_ranks)
        resume_on_this_world(args, resume)  # a DeepSpeed checkpoint of another number of ranks (train/reshard.py)
    set_seed(value("seed"))  # data order, new weights (LoRA, a reward head) and sampling follow --seed
    return PreparedRun(resume_from=resume, args=args)


def trainer_arguments(config, resume: str | None, own_ranks: bool):
    """The Trainer's arguments, built once from the resolved values (transformers then completes its own)."""
    cls = type(config).method.trainer_arguments
    values = dict(getattr(config, TRAIN), resume_from_checkpoint=resume)
    if own_ranks:  # the process group made by prepare_cpu_ranks, not one accelerate would make
        values["accelerator_config"] = {"use_configured_state": True}
    try:
        args = cls(**values)
    except ValueError as e:
        raise UserError(str(e)) from e
    declared = {f.name for f in fields(cls)}
    for name, setting in config.trainer_settings.items():
        if name in declared:
            setattr(args, name, setting)
    return args
