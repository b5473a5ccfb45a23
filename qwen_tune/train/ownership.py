"""What in an output directory is qwen-tune's, when a result is finished, and one run at a time.

`.qwen-tune/owner.json` lists the names qwen-tune wrote in the directory. A name is claimed before its first byte
is written (a checkpoint at the step that will save it, the final files before they are moved in, the logs and
plots at the start), so a kill at any moment leaves no file of ours unclaimed. Everything else is the user's:
qwen-tune never removes or replaces it. The final save is written to `.qwen-tune/final/`, moved in, and
`run_complete.json` is written last: a directory without it is not a finished run, and no command loads it.
`.qwen-tune/lock` is held (flock) for the whole run; the OS releases it on any exit, so a crash leaves none behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time

from ..errors import UserError

STATE_DIR, OWNER, LOCK, STAGING = ".qwen-tune", "owner.json", "lock", "final"
RUN_COMPLETE = "run_complete.json"
# what a run writes as it goes (before any checkpoint): claimed at the start
WRITTEN_WHILE_TRAINING = ("runs", "loss.png", "loss.json", "train_log.jsonl", "ppo_log.jsonl", "grpo_log.jsonl")
# every name a run may write: a user's file by one of these names would be replaced, so such a directory is refused
OUTPUT_NAMES = re.compile(
    r"^(checkpoint-\d+|runs|loss\.(png|json)|MODEL_CARD\.md|run_complete\.json|(train|ppo)_metrics\.json|"
    r"training_args\.(json|bin)|\w+_log\.jsonl|(generation_)?config\.json|model.*\.safetensors(\.index\.json)?|"
    r"adapter_(config\.json|model\.safetensors)|value_head\.safetensors|tokenizer.*\.json|special_tokens_map\.json|"
    r"added_tokens\.json|vocab\.json|merges\.txt|chat_template\.(jinja|json)|\w*processor_config\.json)$")

_held_locks: dict[str, object] = {}  # output dir -> its open, locked file: held until the process exits


def state_path(out: str, *parts: str) -> str:
    return os.path.join(out, STATE_DIR, *parts)


def is_qwen_tune_output(path: str) -> bool:
    return os.path.isfile(state_path(path, OWNER))


def ours(out: str) -> set[str]:
    try:
        with open(state_path(out, OWNER), encoding="utf-8") as f:
            return set(json.load(f)["ours"])
    except (OSError, ValueError, KeyError):
        return set()


def claim(out: str, names) -> None:
    """Record `names` as qwen-tune's, before they are written."""
    _write_ours(out, ours(out) | set(names))


def forget(out: str, names) -> None:
    """After removing some of ours: they are no longer in the directory."""
    _write_ours(out, ours(out) - set(names))


def _write_ours(out: str, names: set[str]) -> None:
    """Atomically: a kill leaves the old list or the new one."""
    os.makedirs(state_path(out), exist_ok=True)
    tmp = state_path(out, OWNER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"ours": sorted(names)}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, state_path(out, OWNER))


def users_entries(out: str) -> list[str]:
    """What in `out` qwen-tune did not write."""
    if not os.path.isdir(out):
        return []
    mine = ours(out)
    return sorted(n for n in os.listdir(out) if n != STATE_DIR and n not in mine)


def would_replace(names) -> list[str]:
    return sorted(n for n in names if OUTPUT_NAMES.match(n))


def lock(out: str) -> None:
    """Hold `out`'s run lock until this process exits; a second run is refused with what holds it. This process
    holding it already (a second run in the same Python) is no second run."""
    if os.path.abspath(out) in _held_locks:
        return
    os.makedirs(state_path(out), exist_ok=True)
    f = open(state_path(out, LOCK), "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"--output_dir {out} is in use by another qwen-tune run ({holder}); nothing was changed. "
                        f"Wait for it to end, or choose another --output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
            f"{' '.join(sys.argv[:1] + sys.argv[1:][:12])}")
    f.flush()
    _held_locks[os.path.abspath(out)] = f


def held_output_dir() -> str | None:
    """The output directory this process is running in (holds the lock of), if any."""
    return next(reversed(_held_locks), None)


def staging_dir(out: str) -> str:
    """Where the final save is written before it is moved in (same file system: the moves are atomic renames)."""
    path = state_path(out, STAGING)
    os.makedirs(path, exist_ok=True)
    return path


def clear_staging(out: str) -> None:
    """At the start of a run: a final save cut short earlier is not kept (the run is resumed or retrained)."""
    shutil.rmtree(state_path(out, STAGING), ignore_errors=True)


def publish(out: str, also: tuple[str, ...] = ()) -> None:
    """Move the staged final files into `out`, replacing only files of ours; `also`: names written next, directly.
    A name the user owns stops it before anything moves, and says where the trained files are."""
    staged = state_path(out, STAGING)
    names = sorted(os.listdir(staged))
    taken = [n for n in users_entries(out) if n in set(names) | set(also)]
    if taken:
        raise UserError(f"the result would replace {', '.join(taken)} in {out}, which qwen-tune did not write; nothing "
                        f"was replaced. The trained model is in {staged}: move it where you want it")
    claim(out, [*names, *also, RUN_COMPLETE])
    for name in names:
        os.replace(os.path.join(staged, name), os.path.join(out, name))
    os.rmdir(staged)


def mark_finished(out: str, summary: dict) -> None:
    """Every file of the result is on disk (flushed): write `run_complete.json`, last."""
    for name in ours(out):
        path = os.path.join(out, name)
        if os.path.isfile(path):
            fsync(path)
    tmp = os.path.join(out, RUN_COMPLETE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({**summary, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(out, RUN_COMPLETE))
    fsync(out)


def is_finished(out: str) -> bool:
    return os.path.isfile(os.path.join(out, RUN_COMPLETE))


def check_finished(path: str) -> None:
    """A qwen-tune output that never got its `run_complete.json` is refused by every command that loads it."""
    if os.path.isdir(path) and is_qwen_tune_output(path) and not is_finished(path):
        raise UserError(f"{path} is a qwen-tune run that did not finish (no {RUN_COMPLETE}: it stopped while training or "
                        f"while saving its result), so it is not loaded. Finish it: run the same command with "
                        f"--resume_from_checkpoint auto")


def fsync(path: str) -> None:
    """Flush a file (or a directory's entries) to disk: a power loss after it keeps them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
