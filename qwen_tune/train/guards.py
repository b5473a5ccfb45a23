"""Guards every trainer runs with: NaN/Inf stop, SIGTERM/SIGINT save-and-exit, free-disk check, whole-run metrics.

They are Trainer callbacks (public hooks). Trainer callbacks never see a batch, so `ObservedSteps`
(put before the Trainer class in a trainer's bases) shows each micro-batch's sample ids and loss to
every `BatchObserver` among the callbacks, through the Trainer's public `training_step`. The NaN
guard is one; tests add their own (a sample-id trace, an injected NaN) the same way.
"""

from __future__ import annotations

import shutil

import torch
from transformers import TrainerCallback

from ..errors import UserError
from .checkpoints import CheckpointSafety, NonFiniteError, latest_complete_checkpoint
from .distributed import log
from .stop_signal import StopSignal, exit_after_saving
from .reshard import UniversalParamGroups
from .run_totals import RunTotals


class BatchObserver(TrainerCallback):
    """A callback that also sees each micro-batch (see `ObservedSteps`)."""

    def on_micro_batch(self, step: int, sample_ids: list | None, loss: torch.Tensor, model) -> None:
        """`step` counts from 1; `loss` is the micro-batch's detached loss, after backward."""


class ObservedSteps:
    """Mixin for a transformers / TRL Trainer: call `on_micro_batch` of every `BatchObserver` callback; a resumed
    run's final metrics are the whole run's (`RunTotals`)."""

    def log(self, logs: dict, start_time: float | None = None) -> None:
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, RunTotals):
                callback.whole_run(logs, self.state)
        super().log(logs, start_time)

    def training_step(self, model, inputs, num_items_in_batch=None):
        ids = inputs.get("sample_ids") if hasattr(inputs, "get") else None
        loss = super().training_step(model, inputs, num_items_in_batch)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, BatchObserver):
                callback.on_micro_batch(self.state.global_step + 1, ids, loss, model)
        return loss


class NonFiniteGuard(BatchObserver):
    """Before each optimizer step: a NaN/Inf loss or gradient stops the run (naming step and samples)
    or, within `--max_bad_steps`, skips the step (gradients dropped, so AdamW leaves every weight as is).

    Under fp16 the grad scaler already skips overflowing steps, so only the loss is watched; under
    DeepSpeed the engine steps inside backward, so the guard can stop the run but not skip.
    """

    def __init__(self, max_bad_steps: int = 0):
        self.max_bad_steps = max_bad_steps
        self.bad_steps = 0
        self.ids: list = []
        self.bad_loss: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.ids, self.bad_loss = [], None

    def on_micro_batch(self, step, sample_ids, loss, model) -> None:
        self.ids.extend(sample_ids or [])
        if loss is not None and not torch.isfinite(loss).all():
            self.bad_loss = float(loss.float().mean())

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step + 1
        problem = f"loss {self.bad_loss}" if self.bad_loss is not None else None
        if problem is None and not args.fp16 and model is not None:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if grads and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))):
                problem = "gradient norm (NaN/Inf)"
        if problem is None:
            return
        samples = ", ".join(map(str, self.ids)) if self.ids else "(ids not recorded)"
        self.bad_steps += 1
        if self.bad_steps > self.max_bad_steps or args.deepspeed:  # DeepSpeed has stepped already: no skipping
            last = latest_complete_checkpoint(args.output_dir)
            raise NonFiniteError(
                f"step {step}: non-finite {problem} on samples {samples}. Stopped before the optimizer step, so no "
                f"weight was changed; last complete checkpoint: {last or 'none'}. Check these samples, lower "
                f"--learning_rate, or pass --max_bad_steps N to skip up to N such steps."
            )
        log(f"warning: step {step}: non-finite {problem} on samples {samples}; skipping this step "
            f"({self.bad_steps} of --max_bad_steps {self.max_bad_steps})")
        if not args.fp16 and optimizer is not None:
            optimizer.zero_grad(set_to_none=True)


class Preemption(TrainerCallback):
    """SIGTERM/SIGINT (train/stop_signal.py): the Trainer finishes the current step, saves a checkpoint and exits."""

    def __init__(self):
        self.stop = StopSignal()
        self.saved_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.stop.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.agreed(args.device):
            control.should_save = True
            control.should_training_stop = True
            self.saved_step = state.global_step
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.stop.__exit__()
        if self.saved_step is not None:
            exit_after_saving(self.stop.signum, self.saved_step, args.output_dir)


def checkpoint_bytes(model) -> int:
    """Rough size of one checkpoint: the saved weights plus AdamW's two moments per trainable parameter."""
    peft = hasattr(model, "peft_config")
    size = lambda p: getattr(p, "ds_numel", p.numel()) * p.element_size()  # noqa: E731 (ZeRO-3 partitions)
    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    saved = trainable if peft else sum(size(p) for p in model.parameters())
    return saved + 2 * trainable


def check_free_space(out: str, needed: int) -> None:
    free = shutil.disk_usage(out).free
    if free < needed * 1.1:
        raise UserError(f"--output_dir {out}: {free / 1e9:.2f} GB free, but a checkpoint needs about "
                        f"{needed / 1e9:.2f} GB (weights + optimizer state); free some space or choose another --output_dir")


class FreeDiskCheck(TrainerCallback):
    """Before the first step: is there room for a checkpoint?"""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and args.should_save:
            check_free_space(args.output_dir, checkpoint_bytes(model))


def safety_callbacks(args, extra: tuple = (), resume_from: str | None = None) -> list:
    """The callbacks that guard every HF / TRL Trainer. `extra` callbacks (a test's fault or trace) come
    first, so that the NaN guard sees what they did to a batch. `resume_from`: the checkpoint the run continues."""
    return [*extra, UniversalParamGroups(resume_from), FreeDiskCheck(), NonFiniteGuard(args.max_bad_steps), Preemption(),
            RunTotals(), CheckpointSafety(args.checkpoint_limit)]  # last: it claims the checkpoint any of them asked for
