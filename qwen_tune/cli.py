"""`qwen-tune SUBCOMMAND ...`: one entry point; user mistakes print a message and exit 2, no traceback."""

from __future__ import annotations

import errno
import importlib
import os
import shutil
import sys

from .train.distributed import finish as finish_distributed
from . import help
from .errors import UserError
from .options import spec as option_spec

# subcommand -> (module with `main(argv)`, one-line description)
COMMANDS = {
    "sft": ("qwen_tune.methods.sft", "supervised fine-tuning: full, LoRA or Q-LoRA (same as python finetune.py)"),
    "preprocess": ("qwen_tune.tools.preprocess", "validate and tokenize data; show what the model will learn"),
    "rm": ("qwen_tune.methods.rm", "train a reward model on preference pairs (Bradley-Terry)"),
    "dpo": ("qwen_tune.methods.dpo", "Direct Preference Optimization on preference pairs"),
    "orpo": ("qwen_tune.methods.orpo", "ORPO: SFT and preference in one stage on pairs, no reference model"),
    "simpo": ("qwen_tune.methods.simpo", "SimPO: length-normalised preference optimization on pairs, no reference model"),
    "kto": ("qwen_tune.methods.kto", "KTO: preference optimization on replies labelled good or bad one at a time, no pairs"),
    "distill": ("qwen_tune.methods.distill", "distil a larger teacher into the model on its own sampled replies (on-policy, GKD)"),
    "ppo": ("qwen_tune.methods.ppo", "PPO on an SFT policy against a reward model or a reward function"),
    "grpo": ("qwen_tune.methods.grpo", "GRPO on an SFT policy with verifiable reward functions (TRL's GRPOTrainer)"),
    "score": ("qwen_tune.tools.score", "score pairs or conversations with a reward model"),
    "merge": ("qwen_tune.tools.merge", "merge a LoRA adapter into its base and save a full model"),
    "chat": ("qwen_tune.tools.chat", "talk to a model (full, adapter or merged): REPL or --prompt"),
    "eval": ("qwen_tune.tools.evaluate", "loss and perplexity over supervised tokens, as JSON"),
    "estimate-memory": ("qwen_tune.tools.estimate_memory", "memory per GPU of a training run, from the model's config.json alone"),
    "ui": ("qwen_tune.ui.server", "a local web page: look at data, launch and watch runs, talk to the results"),
}


OOM_ADVICE = """out of memory. Options that reduce memory, roughly cheapest first:
  --per_device_train_batch_size 1 with a larger --gradient_accumulation_steps (same effective batch)
  --gradient_checkpointing True (recompute activations in backward)
  --model_max_length 256 (shorter samples; longer ones are truncated and counted)
  --use_lora True, or --use_lora True --q_lora True (4-bit base)
  DeepSpeed ZeRO-3 with CPU offload across GPUs (--deepspeed recipes/ds_config_zero3_offload.json, or a ds_config with offload_optimizer/offload_param: cpu)
  `qwen-tune estimate-memory` with the run's options says what each part takes per GPU before you try"""


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; the CPU allocator raises a RuntimeError or MemoryError."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, MemoryError) or isinstance(e, RuntimeError) and (
        "out of memory" in str(e).lower() or "can't allocate memory" in str(e).lower())


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC as Python, safetensors (SafetensorError) and torch's zip writer (a failed write in inline_container.cc)
    report it."""
    text = str(e)
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in text or (
        "inline_container.cc" in text and _free_bytes() is not None and _free_bytes() < 64 * 2**20)


def _free_bytes() -> int | None:
    from .train.ownership import held_output_dir

    out = held_output_dir()
    return shutil.disk_usage(out).free if out and os.path.isdir(out) else None


def disk_full_advice() -> str:
    from .train.checkpoints import latest_complete_checkpoint
    from .train.ownership import held_output_dir

    out = held_output_dir() or "the output directory"
    free = _free_bytes()
    newest = latest_complete_checkpoint(out) if os.path.isdir(out) else None
    return (f"the disk holding {out} is full{f' ({free / 2**20:.0f} MB free)' if free is not None else ''}. Nothing "
            f"complete was lost: {f'the newest complete checkpoint is {newest}' if newest else 'no checkpoint was written yet'}, "
            f"and an unfinished result is never taken for a finished one. Free some space, then run the same command "
            f"with --resume_from_checkpoint auto")


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return ("usage: qwen-tune SUBCOMMAND [--help] [--config FILE.yaml] [options]\n\nsubcommands:\n" + "\n".join(lines)
            + "\n\n`qwen-tune SUBCOMMAND --help` lists qwen-tune's options, grouped, each with its default; --help-all adds every transformers / TRL option."
            + "\n`python finetune.py ...` is the same as `qwen-tune sft ...`.")


def show_help(name: str, which: str) -> None:
    """Print a command's help: qwen-tune's own options, or (`--help-all`, and commands without dataclass options) argparse's full text."""
    module = importlib.import_module(COMMANDS[name][0])
    method = getattr(module, "METHOD", None)
    if which == "--help" and method:
        print(help.own_options(tuple(method.groups.values()), f"qwen-tune {name}"))
    else:
        module.main(["--help"])


def entry(prefix: list[str] | None = None, callbacks: tuple = ()) -> None:
    """`callbacks` go to the training commands' Trainer (tests trace batches and inject faults with them)."""
    argv = (prefix or []) + sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"qwen-tune: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    spec = option_spec.spec_for(name)  # the command's options as data: no torch, transformers or TRL to import
    if (which := help.wanted(rest)) == "--help" and spec:
        print(spec["help"], end="")
        return
    if which:  # --help-all (or --help under libraries with no spec yet): made once, then cached
        help.print_help(name, which, lambda: show_help(name, which))
        return
    if spec:
        try:
            option_spec.check(name, spec, rest)
        except UserError as e:
            print(f"qwen-tune {name}: error: {e}", file=sys.stderr)
            sys.exit(2)
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as e:
        if e.name != COMMANDS[name][0]:
            raise
        print(f"qwen-tune: {name} is not available in this version", file=sys.stderr)
        sys.exit(2)
    succeeded = False
    try:
        run(name, module, rest, callbacks)
        succeeded = True
    finally:
        output_dir = sys.modules.get("qwen_tune.train.output_dir")  # loaded by a run that made its --output_dir
        if not succeeded and output_dir:  # a run that failed before writing anything leaves no empty one behind
            output_dir.remove_if_unused()


def run(name: str, module, rest: list[str], callbacks: tuple) -> None:
    """The command's main, its failures as a user sees them."""
    try:
        module.main(rest, callbacks=callbacks) if callbacks else module.main(rest)
        finish_distributed()  # returns at once in a single process
    except UserError as e:
        print(f"qwen-tune {name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if is_disk_full(e):
            print(f"qwen-tune {name}: error: {disk_full_advice()}", file=sys.stderr)
            sys.exit(2)
        if not is_out_of_memory(e):
            raise
        print(f"qwen-tune {name}: error: {OOM_ADVICE}\n  ({type(e).__name__}: {str(e).splitlines()[0][:200]})", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"qwen-tune {name}: interrupted", file=sys.stderr)
        sys.exit(130)
