"""Crash safety for every trainer: no run loses finished work, and every checkpoint can be resumed.

- `prepare_output_dir(args)` runs before any data or model is loaded: it resolves
  `--resume_from_checkpoint auto|PATH`, refuses to overwrite a finished run or an interrupted
  one's checkpoints, and fails early on an unwritable output directory.
- `SafeCheckpointsMixin` (put it before `transformers.Trainer` in a trainer's bases) writes each
  checkpoint into a hidden staging directory, marks it complete and renames it into place, so a
  kill at any moment leaves either the whole checkpoint or none; rotation only ever counts
  complete checkpoints and never deletes the newest. It also keeps pickles (`training_args.bin`)
  out of the output and refuses to save non-finite weights.
- `safety_callbacks(args)`: the NaN/Inf guard, preemption on SIGTERM/SIGINT (finish the step, save,
  exit 143/130) and the free-disk check; they work on any HF Trainer.

Resuming relies on the HF Trainer, which restores model, optimizer, scheduler, RNG states and the
position in the data order; the optimizer/scheduler/RNG files are torch files that transformers
5.23 loads with `torch.load(weights_only=True)`, i.e. no arbitrary pickles.

Test hooks (read only in `_test_hook`): QWEN_TUNE_TRACE_SAMPLE_IDS=FILE appends one JSON line per
micro-batch, {"step", "rank", "ids"}; QWEN_TUNE_TEST_NAN_AT_STEP=N poisons step N's loss and gradients.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import time

import torch
from transformers import TrainerCallback

from .distributed import is_main_process, log
from .errors import UserError

COMPLETE = "checkpoint_complete.json"  # written last, inside the staging directory, before the rename
STAGING_PREFIX = ".tmp-"  # staging directories: OUT/.tmp-checkpoint-N/checkpoint-N
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
FINISHED_RUN_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                      "pytorch_model.bin", "adapter_model.bin", "train_metrics.json")
REMOVED_ON_OVERWRITE = FINISHED_RUN_FILES + ("adapter_config.json", "training_args.json", "training_args.bin")


def _test_hook(name: str) -> str | None:
    """The one place test-only environment variables are read (see the module docstring)."""
    return os.environ.get({"trace": "QWEN_TUNE_TRACE_SAMPLE_IDS", "nan_step": "QWEN_TUNE_TEST_NAN_AT_STEP"}[name])


# ---- finding checkpoints ------------------------------------------------------------------------

def checkpoints(output_dir: str) -> list[tuple[int, str, bool]]:
    """(step, path, complete) of every `checkpoint-N` directory, oldest step first."""
    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            m = CHECKPOINT_RE.match(name)
            path = os.path.join(output_dir, name)
            if m and os.path.isdir(path):
                found.append((int(m.group(1)), path, os.path.isfile(os.path.join(path, COMPLETE))))
    return sorted(found)


def latest_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint that was completely written (has the completion marker)."""
    complete = [path for _, path, ok in checkpoints(output_dir) if ok]
    return complete[-1] if complete else None


def resolve_resume(args) -> str | None:
    """`--resume_from_checkpoint auto` (or true) -> newest complete checkpoint or None; PATH -> checked PATH."""
    value = getattr(args, "resume_from_checkpoint", None)  # PPO has no mid-run checkpoints to resume
    if value is None or str(value).strip().lower() in ("", "false", "no", "none"):
        return None
    out = args.output_dir
    if str(value).strip().lower() in ("auto", "true", "yes", "latest"):
        for step, path, ok in checkpoints(out):
            if not ok:
                log(f"ignoring {path}: no {COMPLETE} (the run was probably killed while writing it)")
        path = latest_complete_checkpoint(out)
        if path is None:
            log(f"--resume_from_checkpoint auto: no complete checkpoint in {out}; starting fresh")
        else:
            log(f"--resume_from_checkpoint auto: resuming from {path}")
        return path
    path = os.path.expanduser(str(value))
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise UserError(f"--resume_from_checkpoint {value}: not a checkpoint directory (no trainer_state.json); "
                        f"use 'auto' for the newest complete checkpoint in --output_dir")
    if not os.path.isfile(os.path.join(path, COMPLETE)):
        log(f"note: {path} has no {COMPLETE} (not written by qwen-tune, or cut short); resuming from it anyway")
    return path


# ---- before any work ----------------------------------------------------------------------------

def prepare_output_dir(args) -> None:
    """Refuse, before any work, to start a run that would lose work or could not save it.

    Sets `args.resume_from_checkpoint` to the resolved checkpoint path (or None).
    """
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_dir {out} exists and is not a directory")
    resume = resolve_resume(args)
    if hasattr(args, "resume_from_checkpoint"):
        args.resume_from_checkpoint = resume
    main_process = is_main_process()
    if resume is None and os.path.isdir(out):
        finished = [f for f in FINISHED_RUN_FILES if os.path.exists(os.path.join(out, f))]
        previous = [os.path.basename(path) for _, path, _ in checkpoints(out)]
        if (finished or previous) and not args.overwrite_output_dir:
            what = (f"a finished run ({', '.join(finished)})" if finished
                    else f"checkpoints of an interrupted run ({', '.join(previous[-3:])})")
            raise UserError(f"--output_dir {out} holds {what}. Continue it with --resume_from_checkpoint auto, "
                            f"replace it with --overwrite_output_dir, or choose another --output_dir")
        if (finished or previous) and main_process:
            log(f"--overwrite_output_dir: removing the earlier run's {', '.join(finished + previous)} from {out}")
            for name in previous:
                shutil.rmtree(os.path.join(out, name))
            for name in REMOVED_ON_OVERWRITE:
                if os.path.exists(os.path.join(out, name)):
                    os.remove(os.path.join(out, name))
    if main_process and os.path.isdir(out):
        for name in os.listdir(out):
            if name.startswith(STAGING_PREFIX + "checkpoint-"):
                log(f"removing {os.path.join(out, name)}: a checkpoint cut short while being written")
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    check_writable(out)


def check_writable(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"--output_dir {out} is not writable ({e.strerror or e}); checkpoints could not be saved") from e


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


def is_finite_model(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.is_floating_point())


# ---- the trainer mixin --------------------------------------------------------------------------

class NonFiniteError(UserError):
    """A step's loss or gradient was NaN/Inf: stop before the weights are spoiled."""


class SafeCheckpointsMixin:
    """Atomic checkpoints, pickle-free output and per-batch sample ids for the NaN guard.

    Usage: `class MyTrainer(SafeCheckpointsMixin, transformers.Trainer)`.
    """

    _staging_run_dir: str | None = None

    def _get_output_dir(self, trial):
        return self._staging_run_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """Let the Trainer write OUT/.tmp-checkpoint-N/checkpoint-N, mark it complete, rename it to OUT/checkpoint-N."""
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        staging, final = os.path.join(run_dir, STAGING_PREFIX + name), os.path.join(run_dir, name)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging_run_dir = staging
        try:
            super()._save_checkpoint(model, trial)  # its own rotation sees only the staging dir: a no-op
        finally:
            self._staging_run_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            written = os.path.join(staging, name)
            if self.state.best_model_checkpoint == written:
                self.state.best_model_checkpoint = final
                self.state.save_to_json(os.path.join(written, "trainer_state.json"))
            with open(os.path.join(written, COMPLETE), "w") as f:
                json.dump({"step": self.state.global_step, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
            _fsync_tree(written)
            if os.path.exists(final):  # an older checkpoint of the same step (a resumed run): swap it out
                os.replace(final, os.path.join(staging, "replaced"))
            os.replace(written, final)
            _fsync_dir(run_dir)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(run_dir, self.args.save_total_limit, keep={final, self.state.best_model_checkpoint})
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir=None, _internal_call=False):
        """Refuse non-finite weights; write the training arguments as JSON instead of a pickle."""
        if not is_finite_model(self.model):
            raise NonFiniteError(f"refusing to save non-finite (NaN/Inf) weights to {output_dir or self.args.output_dir}; "
                                 f"the last complete checkpoint is {latest_complete_checkpoint(self.args.output_dir)}")
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            pickle = os.path.join(output_dir, "training_args.bin")
            if os.path.exists(pickle):
                os.remove(pickle)
            with open(os.path.join(output_dir, "training_args.json"), "w") as f:
                f.write(self.args.to_json_string())

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Note the batch's sample ids and loss for the NaN guard (and the trace test hook)."""
        step = self.state.global_step + 1
        ids = inputs.get("sample_ids") if hasattr(inputs, "get") else None
        trace = _test_hook("trace")
        if trace:
            with open(trace, "a") as f:
                f.write(json.dumps({"step": step, "rank": int(os.environ.get("RANK", "0")), "ids": ids}) + "\n")
        loss = super().training_step(model, inputs, num_items_in_batch)
        nan_step = _test_hook("nan_step")
        if nan_step and int(nan_step) == step:  # test hook: what a diverging batch does
            loss = loss * float("nan")
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(float("nan"))
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, NonFiniteGuard):
                cb.note_batch(ids, loss)
        return loss


def rotate_checkpoints(run_dir: str, limit: int | None, keep: set) -> None:
    """Delete the oldest complete checkpoints beyond `limit`; never one in `keep`, never an incomplete one."""
    if not limit or limit <= 0:
        return
    complete = [path for _, path, ok in checkpoints(run_dir) if ok]
    excess = len(complete) - max(limit, len(keep & set(complete)))
    for path in complete:
        if excess <= 0:
            break
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
            excess -= 1


def _fsync_tree(path: str) -> None:
    """Flush every file of a checkpoint to disk before it is renamed into place (power loss, not just kills)."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- callbacks ----------------------------------------------------------------------------------

class NonFiniteGuard(TrainerCallback):
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

    def note_batch(self, ids, loss) -> None:
        self.ids.extend(ids or [])
        if loss is not None and not torch.isfinite(loss.detach()).all():
            self.bad_loss = float(loss.detach().float().mean())

    def on_step_begin(self, args, state, control, **kwargs):
        self.ids, self.bad_loss = [], None

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step + 1
        problem = f"loss {self.bad_loss}" if self.bad_loss is not None else None
        if problem is None and not args.fp16 and model is not None:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if grads and not _finite_norm(grads):
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


def _finite_norm(grads: list) -> bool:
    norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6: one fused reduction
    total = norm(grads) if norm else torch.stack([g.float().norm() for g in grads]).norm()
    return bool(torch.isfinite(total))


class Preemption(TrainerCallback):
    """SIGTERM/SIGINT: finish the current step, save a checkpoint, exit 143 (SIGTERM) or 130 (SIGINT).

    A second signal acts at once (the default handler is back in place after the first).
    """

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}
        self.saved_step: int | None = None

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))
        log(f"\nreceived {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
            f"(send it again to stop at once)")

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                return

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.signum is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # all ranks stop together
            flag = torch.tensor([int(self.signum or 0)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop, self.signum = bool(flag.item()), int(flag.item()) or None
        if stop:
            control.should_save = True
            control.should_training_stop = True
            self.saved_step = state.global_step
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
        if self.saved_step is not None:
            name = signal.Signals(self.signum).name
            log(f"{name}: stopped after step {self.saved_step} and saved "
                f"{os.path.join(args.output_dir, f'checkpoint-{self.saved_step}')}. "
                f"Continue with the same command plus --resume_from_checkpoint auto")
            raise SystemExit(128 + self.signum)


class CheckpointSafety(TrainerCallback):
    """Free-disk check before the first step; completion marker for trainers without the mixin."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and args.should_save:
            check_free_space(args.output_dir, checkpoint_bytes(model))

    def on_save(self, args, state, control, **kwargs):
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if args.should_save and os.path.isdir(path) and not os.path.exists(os.path.join(path, COMPLETE)):
            with open(os.path.join(path, COMPLETE), "w") as f:  # the Trainer has finished writing it
                json.dump({"step": state.global_step, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)


def safety_callbacks(args) -> list:
    """Trainer callbacks that guard a run; add them to every HF Trainer."""
    return [CheckpointSafety(), NonFiniteGuard(getattr(args, "max_bad_steps", 0)), Preemption()]
