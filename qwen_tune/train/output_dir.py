"""Before any data or model is loaded: is the output directory safe to use, and is this a resume?

`prepare_output_dir(out, overwrite, resume)` resolves `--resume_from_checkpoint auto|PATH` (a DeepSpeed one on any number of ranks),
refuses to overwrite a finished run, an interrupted one's checkpoints or a user's files, fails early on an unwritable
directory and takes the directory's run lock.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from ..errors import UserError
from ..trust import check_checkpoint_pickles
from . import ownership
from .checkpoints import COMPLETE, checkpoints, latest_complete_checkpoint
from .distributed import is_main_process, log


def asks_to_resume(value) -> bool:
    return value is not None and str(value).strip().lower() not in ("", "false", "no", "none")


def resolve_resume(out: str, value: str | None) -> str | None:
    """`--resume_from_checkpoint auto` (or true) -> newest complete checkpoint or None; PATH -> checked PATH."""
    if not asks_to_resume(value):
        return None
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


_made_here: list[str] = []  # the output directories this process created


def remove_if_unused() -> None:
    """After a run failed before it wrote anything (a missing data file, bad JSON, a model that does not load): the
    output directory it created goes again, when it holds nothing but qwen-tune's own bookkeeping."""
    while _made_here:
        out = _made_here.pop()
        try:  # nothing but the lock and owner files: a staged final save (a run that trained) is kept
            unused = os.listdir(out) == [ownership.STATE_DIR] and not os.path.exists(ownership.state_path(out, ownership.STAGING))
        except OSError:
            continue
        if unused:
            shutil.rmtree(out, ignore_errors=True)


# ---- before any work ----------------------------------------------------------------------------

def prepare_output_dir(out: str, overwrite: bool, resume_from_checkpoint: str | None) -> str | None:
    """Refuse, before any work, to start a run that would lose work, touch the user's files or could not save;
    then hold the directory's lock for the run (ownership.py). Returns the checkpoint to resume from (or None)."""
    if os.path.islink(out) and not os.path.exists(out):
        raise UserError(f"--output_dir {out} is a symbolic link to {os.readlink(out)}, which does not exist; create "
                        f"that directory or choose another --output_dir")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_dir {out} exists and is not a directory")
    check_users_files(out, overwrite)
    main_process = is_main_process()
    if main_process:
        new = not os.path.lexists(out)
        check_writable(out)
        if new:
            _made_here.append(out)
        ownership.lock(out)
    finished = ownership.is_finished(out)
    if finished and asks_to_resume(resume_from_checkpoint) and not overwrite:
        raise UserError(f"--output_dir {out} holds a finished run ({ownership.RUN_COMPLETE}): there is nothing to resume, "
                        f"and nothing was changed. To train it again, pass --overwrite_output_dir instead")
    resume = resolve_resume(out, resume_from_checkpoint)
    if resume is None and os.path.isdir(out):
        previous = [os.path.basename(path) for _, path, _ in checkpoints(out)]
        if finished and not overwrite:
            raise UserError(f"--output_dir {out} holds a finished run. Replace it with --overwrite_output_dir, or choose "
                            f"another --output_dir")
        if previous and not overwrite:
            raise UserError(f"--output_dir {out} holds checkpoints of an interrupted run ({', '.join(previous[-3:])}). "
                            f"Continue it with --resume_from_checkpoint auto, replace it with --overwrite_output_dir, "
                            f"or choose another --output_dir")
        if main_process:
            remove_earlier_run(out)
    if main_process:
        ownership.clear_staging(out)
        ownership.claim(out, [n for n in ownership.WRITTEN_WHILE_TRAINING if n not in ownership.users_entries(out)])
    return resume


def check_users_files(out: str, overwrite: bool) -> None:
    """A directory holding files qwen-tune did not write is used only when the user says so, and never when one of
    them has a name qwen-tune writes. Another run's output inside it (the reward recipe's OUT/pmp) is left alone
    and needs no flag."""
    users = [n for n in ownership.users_entries(out)
             if ownership.would_replace([n]) or not ownership.is_qwen_tune_output(os.path.join(out, n))]
    if not users:
        return
    shown = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
    clash = ownership.would_replace(users)
    if clash:
        raise UserError(f"--output_dir {out} holds {', '.join(clash[:5])}, which qwen-tune did not write but a run "
                        f"writes; nothing was changed. Choose another --output_dir (or move them)")
    if not overwrite:
        raise UserError(f"--output_dir {out} holds files qwen-tune did not write ({shown}). Choose a new or empty "
                        f"directory, or pass --overwrite_output_dir True to write beside them: qwen-tune never "
                        f"removes or replaces a file it did not write")


def remove_earlier_run(out: str) -> None:
    """Before a fresh run: what an earlier qwen-tune run wrote here (only that) goes. A finished run or a resumable
    one got here only with --overwrite_output_dir; what is left is a run stopped before it saved anything."""
    earlier = sorted(n for n in ownership.ours(out) if os.path.lexists(os.path.join(out, n)))
    if not earlier:
        return
    log(f"removing the earlier run's {', '.join(earlier)} from {out}")
    for name in earlier:
        path = os.path.join(out, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    ownership.forget(out, earlier)


def check_writable(out: str) -> None:
    """In qwen-tune's own folder of `out`, so that another rank looking for the user's files never sees the probe."""
    own = ownership.state_path(out)
    try:
        os.makedirs(own, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=own, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"--output_dir {out} is not writable ({e.strerror or e}); checkpoints could not be saved") from e
