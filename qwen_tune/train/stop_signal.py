"""SIGTERM / SIGINT during training (a preempted node, Ctrl-C): finish the step, save a checkpoint, exit 143 / 130.

One handler for every method: the Trainer methods use it through `guards.Preemption`, ppo's loop directly. A second
signal acts at once (the previous handler is back in place after the first).
"""

from __future__ import annotations

import os
import signal

import torch

from .distributed import log


class StopSignal:
    """Notes a signal while the loop runs, so the loop can finish its step, save and exit. Inactive (signals act at
    once) when the loop cannot save."""

    def __init__(self, active: bool = True):
        self.active = active
        self.signum: int | None = None
        self.previous: dict = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT) if self.active else ():
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                break
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))
        log(f"received {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
            f"(send it again to stop at once)")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
        return False

    def agreed(self, device) -> int | None:
        """The signal, agreed over all ranks (it reaches them at different moments: all stop after the same step)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([int(self.signum or 0)], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.signum = int(flag.item()) or None
        return self.signum


def exit_after_saving(signum: int, step: int, output_dir: str):
    """Say where the run was saved and how to continue it, then exit 128 + the signal's number."""
    log(f"{signal.Signals(signum).name}: stopped after step {step} and saved {os.path.join(output_dir, f'checkpoint-{step}')}. "
        f"Continue with the same command plus --resume_from_checkpoint auto")
    raise SystemExit(128 + signum)
