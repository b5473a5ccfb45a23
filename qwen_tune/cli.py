"""`qwen-tune SUBCOMMAND ...`: one entry point; user mistakes print a message and exit 2, no traceback."""

from __future__ import annotations

import importlib
import sys

from .errors import UserError

# subcommand -> (module with `main(argv)`, one-line description)
COMMANDS = {
    "sft": ("qwen_tune.sft", "supervised fine-tuning: full, LoRA or Q-LoRA (same as python finetune.py)"),
    "preprocess": ("qwen_tune.preprocess", "validate and tokenize data; show what the model will learn"),
    "rm": ("qwen_tune.reward", "train a reward model on preference pairs (Bradley-Terry)"),
    "dpo": ("qwen_tune.dpo", "Direct Preference Optimization on preference pairs"),
    "ppo": ("qwen_tune.ppo", "PPO on an SFT policy against a reward model or a reward function"),
    "score": ("qwen_tune.score", "score pairs or conversations with a reward model"),
    "merge": ("qwen_tune.export", "merge a LoRA adapter into its base and save a full model"),
    "chat": ("qwen_tune.chat", "talk to a model (full, adapter or merged): REPL or --prompt"),
    "eval": ("qwen_tune.evaluate", "loss and perplexity over supervised tokens, as JSON"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "usage: qwen-tune SUBCOMMAND [--help] [options]\n\nsubcommands:\n" + "\n".join(lines)


def entry(prefix: list[str] | None = None) -> None:
    argv = (prefix or []) + sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"qwen-tune: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as e:
        if e.name != COMMANDS[name][0]:
            raise
        print(f"qwen-tune: {name} is not available in this version", file=sys.stderr)
        sys.exit(2)
    try:
        module.main(rest)
    except UserError as e:
        print(f"qwen-tune {name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"qwen-tune {name}: interrupted", file=sys.stderr)
        sys.exit(130)
