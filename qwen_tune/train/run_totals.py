"""A resumed run's metrics cover the whole run, not only its last segment.

The Trainer's end-of-training metrics (`train_runtime`, `train_loss`, the speeds) count only the steps of the
current `train()` call. `RunTotals` keeps the training time and the sum of the logged losses up to each checkpoint
in that checkpoint's trainer_state.json (an `ExportableState`, saved by the Trainer itself), and reads them back
when the run resumes from it; `whole_run(logs, state)` then turns the final metrics into the whole run's: runtime
summed over segments, loss averaged over every step. Every checkpoint step is also a logged step (`on_step_end`),
so the losses summed up to a checkpoint are those of all its steps.
"""

from __future__ import annotations

import time

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState


class RunTotals(TrainerCallback, ExportableState):
    """Training time and summed step losses, carried from checkpoint to resumed run."""

    def __init__(self):
        self.started = time.time()
        self.runtime_before = 0.0  # of the earlier segments, up to the checkpoint this run resumed
        self.loss_before = 0.0  # their steps' losses, summed
        self.loss_sum = 0.0  # of every step up to `logged_step`
        self.logged_step = 0
        self.resumed_step = 0  # 0: this run started from scratch

    def state(self) -> dict:
        return {"args": {}, "attributes": {"runtime": self.runtime_before + time.time() - self.started,
                                           "loss_sum": self.loss_sum, "logged_step": self.logged_step}}

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.time()
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, dict) and state.global_step and saved["attributes"]["logged_step"] == state.global_step:
            totals = saved["attributes"]
            self.runtime_before, self.loss_before = totals["runtime"], totals["loss_sum"]
            self.loss_sum = self.loss_before
            self.logged_step = self.resumed_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:  # the Trainer logs before it saves: the checkpoint then holds every step's loss
            control.should_log = True
        return control

    on_epoch_end = on_step_end

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and state.global_step > self.logged_step:
            self.loss_sum += logs["loss"] * (state.global_step - self.logged_step)
            self.logged_step = state.global_step

    def whole_run(self, logs: dict, state) -> None:
        """The Trainer's final metrics (`train_loss` among them), in place, for the whole run when it was resumed."""
        if not self.resumed_step or "train_loss" not in logs or "train_runtime" not in logs:
            return
        steps = state.global_step - self.resumed_step
        runtime = logs["train_runtime"]
        total = self.runtime_before + runtime
        logs["train_loss"] = (self.loss_before + logs["train_loss"] * steps) / max(state.global_step, 1)
        if "train_samples_per_second" in logs and steps:
            samples = logs["train_samples_per_second"] * runtime / steps * state.global_step
            logs["train_samples_per_second"] = round(samples / total, 3)
        if "train_steps_per_second" in logs:
            logs["train_steps_per_second"] = round(state.global_step / total, 3)
        logs["train_runtime"] = round(total, 4)
