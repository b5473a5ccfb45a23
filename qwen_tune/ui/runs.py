"""Runs as the page sees them: ordinary `qwen-tune` processes writing ordinary output directories.

The page starts a run as `python -m qwen_tune METHOD ...` (its console output kept under the first root, in
`.qwen-tune-ui/logs/`), stops one with SIGTERM (the command saves a checkpoint and exits, as on a terminal) and
resumes one by running its command again with `--resume_from_checkpoint auto`. Runs started elsewhere are found
by their output directories under the roots; the pid in their run lock lets the page stop them too.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from ..train import ownership
from ..train.checkpoints import latest_complete_checkpoint
from .progress import read_progress
from .roots import Roots

STARTUP_LIMIT_S = 300  # how long a launch waits for its run to start training (or to fail)


@dataclass
class Launched:
    process: subprocess.Popen
    args: list[str]  # the qwen-tune arguments, the command first
    log: str  # its console output
    started: float
    stopped: bool = False


def command_text(args: list[str]) -> str:
    return "qwen-tune " + shlex.join(args)


def qwen_tune_args(argv: list[str]) -> list[str]:
    """A run's sys.argv (from its begin record) as qwen-tune arguments: `python finetune.py ...` is `sft ...`."""
    return ["sft", *argv[1:]] if os.path.basename(argv[0]) == "finetune.py" else list(argv[1:])


def with_resume(args: list[str]) -> list[str]:
    """The same command, resuming from the newest complete checkpoint (an earlier resume option replaced)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--resume_from_checkpoint":
            skip = True
        elif not arg.startswith("--resume_from_checkpoint="):
            out.append(arg)
    return out + ["--resume_from_checkpoint", "auto"]


def lock_holder(out: str) -> int | None:
    """The pid of a live process on this machine holding `out`'s run lock (its lock file says which), if one does."""
    try:
        with open(ownership.state_path(out, ownership.LOCK), encoding="utf-8") as f:
            words = f.read().split()
        pid, host = int(words[1]), words[3].rstrip(",")
    except (OSError, ValueError, IndexError):
        return None
    return pid if host == socket.gethostname() and _alive(pid) else None


def _alive(pid: int) -> bool:
    """A running qwen-tune process: not an exited one its parent has not reaped yet (a zombie holds no lock), and not
    another program that got the pid since (the page only ever signals qwen-tune runs)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            if f.read().rsplit(")", 1)[-1].split()[0] == "Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read()
    except OSError:
        return False
    return any(name in command for name in (b"qwen_tune", b"qwen-tune", b"finetune.py"))


class Runs:
    """The runs under the roots, and the ones this page started."""

    def __init__(self, roots: Roots):
        self.roots, self.launched, self.lock = roots, {}, threading.Lock()

    def output_dirs(self) -> list[str]:
        found = {d for d, _, _ in self.roots.walk() if ownership.is_qwen_tune_output(d)}
        return sorted(found | set(self.launched), key=lambda d: -_mtime(d))

    def describe(self, out: str, detail: bool = False) -> dict:
        progress, launched = read_progress(out), self.launched.get(out)
        running = launched is not None and launched.process.poll() is None
        pid = None if running else lock_holder(out)
        finished = ownership.is_finished(out)
        if running:
            status = "running" if progress.started and progress.started >= launched.started else "starting"
        elif pid is not None:
            status = "running"
        elif finished:
            status = "finished"
        elif launched is not None and launched.process.returncode not in (0, 143, 130) and not launched.stopped:
            status = "failed"
        else:
            status = "stopped"
        args = launched.args if launched else qwen_tune_args(progress.argv) if progress.argv else None
        resumable = status in ("stopped", "failed") and args is not None and latest_complete_checkpoint(out) is not None
        info = {"id": out, "name": os.path.relpath(out, self.roots.home), "method": args[0] if args else _method(out),
                "status": status, "step": progress.step, "max_steps": progress.max_steps,
                "eta_seconds": progress.eta_seconds if status == "running" else None,
                "tokens_per_second": progress.tokens_per_second, "loss": progress.loss,
                "command": command_text(args) if args else None,
                "can_stop": status in ("running", "starting"), "can_resume": resumable}
        if detail:
            info["series"] = progress.series
            info["log"] = _tail(launched.log) if launched else "\n".join(
                ["(started outside this page: its console is where it was started; its log lines:)", *progress.lines[-40:]])
        return info

    def launch(self, args: list[str], out: str) -> dict:
        """Start `qwen-tune ARGS`, and wait until it trains or ends: an error is then the command's own message."""
        with self.lock:
            current = self.launched.get(out)
            if current is not None and current.process.poll() is None:
                return {"ok": False, "error": f"{out} is already being trained by this page ({command_text(current.args)})"}
            log = self._log_path(out)
            with open(log, "a", encoding="utf-8") as f:
                f.write(f"$ {command_text(args)}\n")
                process = subprocess.Popen([sys.executable, "-m", "qwen_tune", *args], cwd=self.roots.home, stdout=f,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
            self.launched[out] = Launched(process, list(args), log, time.time())
        deadline = time.time() + STARTUP_LIMIT_S
        while time.time() < deadline and self.describe(out)["status"] == "starting":
            time.sleep(0.2)
        if process.poll() not in (None, 0):
            return {"ok": False, "error": _error_message(log) or f"the run exited with code {process.returncode}; see its log",
                    "id": out}
        return {"ok": True, "id": out, "command": command_text(args)}

    def stop(self, out: str) -> dict:
        launched = self.launched.get(out)
        if launched is not None and launched.process.poll() is None:
            launched.stopped = True
            launched.process.send_signal(signal.SIGTERM)
            return {"ok": True}
        pid = lock_holder(out)
        if pid is None:
            return {"ok": False, "error": f"{out}: no run of it is going on here"}
        os.kill(pid, signal.SIGTERM)
        return {"ok": True}

    def resume(self, out: str) -> dict:
        info = self.describe(out)
        if not info["can_resume"]:
            return {"ok": False, "error": f"{out} cannot be resumed (it is {info['status']}"
                                          f"{'' if latest_complete_checkpoint(out) else ', with no complete checkpoint'})"}
        launched = self.launched.get(out)
        args = launched.args if launched else qwen_tune_args(read_progress(out).argv)
        return self.launch(with_resume(args), out)

    def _log_path(self, out: str) -> str:
        directory = os.path.join(self.roots.home, ".qwen-tune-ui", "logs")
        os.makedirs(directory, exist_ok=True)
        return os.path.join(directory, f"{os.path.basename(out)}-{hashlib.sha1(out.encode()).hexdigest()[:8]}.log")


def _method(out: str) -> str | None:
    import json

    try:
        with open(os.path.join(out, ownership.RUN_COMPLETE), encoding="utf-8") as f:
            return json.load(f).get("method")
    except (OSError, ValueError):
        return None


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


def _tail(path: str, lines: int = 60) -> str:
    """The end of a console log, each progress-bar line as its last redraw."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()[-200_000:]
    except OSError:
        return ""
    return "\n".join(line.split("\r")[-1] for line in text.splitlines()[-lines:])


def _error_message(log: str) -> str | None:
    """The command's error as it printed it (`qwen-tune sft: error: ...` and the lines after it)."""
    lines = _tail(log, 200).splitlines()
    start = next((i for i in range(len(lines) - 1, -1, -1) if ": error: " in lines[i] and lines[i].startswith("qwen-tune")), None)
    return "\n".join(lines[start:]).strip() if start is not None else None
