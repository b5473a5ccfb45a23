"""Before any data or model is loaded: is the output directory safe to use, and is this a resume?

`prepare_output_dir(args)` resolves `--resume_from_checkpoint auto|PATH`, refuses to overwrite a
finished run or an interrupted one's checkpoints, and fails early on an unwritable directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from ..errors import UserError
from ..trust import check_checkpoint_pickles
from .checkpoints import COMPLETE, checkpoints, latest_complete_checkpoint
from .distributed import is_main_process, log

FINISHED_RUN_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                      "pytorch_model.bin", "adapter_model.bin", "train_metrics.json")
REMOVED_ON_OVERWRITE = FINISHED_RUN_FILES + ("adapter_config.json", "training_args.json", "training_args.bin", "grpo_log.jsonl")


def resolve_resume(args) -> str | None:
    """`--resume_from_checkpoint auto` (or true) -> newest complete checkpoint or None; PATH -> checked PATH."""
    value = getattr(args, "resume_from_checkpoint", None)  # PPO has no mid-run checkpoints to resume
    if value is None or str(value).strip().lower() in ("", "false", "no", "none"):
        return None
    out = args.output_dir
    if str(value).strip().lower() in ("auto", "true", "yes", "latest"):
        path = latest_complete_checkpoint(out)
        for _, cut_short, ok in checkpoints(out):
            if not ok and is_main_process():  # the Trainer would write into it again; a half-written file must not stay
                log(f"ignoring and removing {cut_short}: no {COMPLETE} (the run was killed while writing it)")
                shutil.rmtree(cut_short, ignore_errors=True)
        if path is None:
            log(f"--resume_from_checkpoint auto: no complete checkpoint in {out}; starting fresh")
        else:
            check_checkpoint_pickles(path)
            log(f"--resume_from_checkpoint auto: resuming from {path}")
        return path
    path = os.path.expanduser(str(value))
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise UserError(f"--resume_from_checkpoint {value}: not a checkpoint directory (no trainer_state.json); "
                        f"use 'auto' for the newest complete checkpoint in --output_dir")
    if not os.path.isfile(os.path.join(path, COMPLETE)):
        log(f"note: {path} has no {COMPLETE} (not written by qwen-tune, or cut short); resuming from it anyway")
    check_checkpoint_pickles(path)
    return path


# ---- before any work ----------------------------------------------------------------------------

def prepare_output_dir(args) -> None:
    """Refuse, before any work, to start a run that would lose work or could not save it.

    Sets `args.resume_from_checkpoint` to the resolved checkpoint path (or None).
    """
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_dir {out} exists and is not a directory")
    finished = [f for f in FINISHED_RUN_FILES if os.path.exists(os.path.join(out, f))]
    asked = str(getattr(args, "resume_from_checkpoint", None) or "").strip().lower() not in ("", "false", "no", "none")
    if finished and asked and not args.overwrite_output_dir:
        raise UserError(f"--output_dir {out} holds a finished run ({', '.join(finished)}): there is nothing to resume, and "
                        f"nothing was changed. To train it again, pass --overwrite_output_dir instead")
    resume = resolve_resume(args)
    if hasattr(args, "resume_from_checkpoint"):
        args.resume_from_checkpoint = resume
    main_process = is_main_process()
    if resume is None and os.path.isdir(out):
        previous = [os.path.basename(path) for _, path, _ in checkpoints(out)]
        if finished and not args.overwrite_output_dir:
            raise UserError(f"--output_dir {out} holds a finished run ({', '.join(finished)}). Replace it with "
                            f"--overwrite_output_dir, or choose another --output_dir")
        if previous and not args.overwrite_output_dir:
            raise UserError(f"--output_dir {out} holds checkpoints of an interrupted run ({', '.join(previous[-3:])}). "
                            f"Continue it with --resume_from_checkpoint auto, replace it with --overwrite_output_dir, "
                            f"or choose another --output_dir")
        if (finished or previous) and main_process:
            log(f"--overwrite_output_dir: removing the earlier run's {', '.join(finished + previous)} from {out}")
            for name in previous:
                shutil.rmtree(os.path.join(out, name))
            for name in REMOVED_ON_OVERWRITE:
                if os.path.exists(os.path.join(out, name)):
                    os.remove(os.path.join(out, name))
    check_writable(out)


def check_writable(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"--output_dir {out} is not writable ({e.strerror or e}); checkpoints could not be saved") from e
