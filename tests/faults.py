"""`python tests/faults.py [--trace FILE] [--nan_at_step N] COMMAND ARGS...`: qwen-tune COMMAND with test callbacks.

--trace FILE      appends one JSON line per micro-batch: {"step", "rank", "pid", "ids"} (which samples each step saw,
                  and which process trained it: the one a test SIGKILLs)
--nan_at_step N   makes step N's loss and gradients NaN, as a diverging batch would
--oom_at_step N   raises CUDA's out-of-memory error in step N, as a too-large batch would
--hold_while PATH holds the run before its second step while PATH exists, so that a test can act on a run in
                  progress (a second run, a kill) at a known point, then let it finish
--kill_in_final_save half   SIGKILLs the run once half of its staged final files are moved in (the end of the
                  final save, the moment a kill used to leave a broken output that looked finished)

They reach the trainer as ordinary callbacks (`main(argv, callbacks=...)`), so shipped code has no test switch.
"""

import json
import os
import sys
import time

from qwen_tune.cli import entry  # first: importing qwen_tune attaches its filters of library noise (quiet.py)
from qwen_tune.train.guards import BatchObserver
from transformers import TrainerCallback


class TraceSampleIds(BatchObserver):
    def __init__(self, path: str):
        self.path = path

    def on_micro_batch(self, step, sample_ids, loss, model):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "rank": int(os.environ.get("RANK", "0")), "pid": os.getpid(),
                                "ids": sample_ids}) + "\n")


class NaNAtStep(BatchObserver):
    def __init__(self, step: int):
        self.step = step

    def on_micro_batch(self, step, sample_ids, loss, model):
        if step == self.step:
            loss.mul_(float("nan"))
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(float("nan"))


class OutOfMemoryAtStep(BatchObserver):
    def __init__(self, step: int):
        self.step = step

    def on_micro_batch(self, step, sample_ids, loss, model):
        if step == self.step:
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")


class HoldWhile(TrainerCallback):
    def __init__(self, path: str):
        self.path = path

    def on_step_begin(self, args, state, control, **kwargs):
        while state.global_step == 1 and os.path.exists(self.path):
            time.sleep(0.02)


def kill_in_final_save(when: str) -> None:
    """Replace `ownership.publish` by one that moves half the staged files in, then kills this process."""
    import signal

    from qwen_tune.train import ownership

    assert when == "half"

    def publish_half_then_die(out, also=()):
        staged = ownership.state_path(out, ownership.STAGING)
        names = sorted(os.listdir(staged))
        ownership.claim(out, [*names, *also])
        for name in names[: len(names) // 2]:
            os.replace(os.path.join(staged, name), os.path.join(out, name))
        os.kill(os.getpid(), signal.SIGKILL)

    ownership.publish = publish_half_then_die


FAULTS = {"--trace": TraceSampleIds, "--nan_at_step": lambda v: NaNAtStep(int(v)),
          "--oom_at_step": lambda v: OutOfMemoryAtStep(int(v)), "--kill_in_final_save": kill_in_final_save,
          "--hold_while": HoldWhile}


def main() -> None:
    argv, callbacks = sys.argv[1:], []
    while argv and argv[0] in FAULTS:
        flag, value, argv = argv[0], argv[1], argv[2:]
        fault = FAULTS[flag](value)
        if fault is not None:  # a patch, not a callback
            callbacks.append(fault)
    sys.argv = [sys.argv[0], *argv]
    entry(callbacks=tuple(callbacks))


if __name__ == "__main__":
    main()
