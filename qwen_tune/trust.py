"""Nothing in a checkpoint runs unless the user asked: no custom Python, no pickles.

transformers runs a checkpoint's own Python when a config names classes in `auto_map` and the caller passes
`trust_remote_code=True`; when the caller passes nothing it asks on stdin, and a `y` piped in runs the code.
qwen-tune looks first: every command that reads a checkpoint (training, chat, eval, score, merge, preprocess) calls
`check_checkpoint` before transformers sees the directory, and passes the user's flag to every load, so transformers
never asks. Pickle weights (`*.bin`, `*.pt`) can run code when loaded: they need `--allow_pickle_weights`.
"""

from __future__ import annotations

import json
import os

from .errors import UserError
from .train.ownership import check_finished

# the files in which transformers looks for `auto_map` (configuration, model, tokenizer, processor classes)
CODE_NAMING_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                     "video_preprocessor_config.json", "feature_extractor_config.json")
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")


def custom_code(directory: str) -> list[str]:
    """Where `directory` names Python of its own: "config.json (auto_map: AutoConfig, AutoModelForCausalLM)", ...
    A LoRA adapter's base counts too: loading the adapter loads it."""
    found = []
    for name in CODE_NAMING_FILES:
        path = os.path.join(directory, name)
        try:
            with open(path, encoding="utf-8") as f:
                auto_map = json.load(f).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue  # absent or unreadable: transformers says why when it reads it
        if auto_map:
            found.append(f"{name} (auto_map: {', '.join(sorted(auto_map) if isinstance(auto_map, dict) else map(str, auto_map))})")
    base = adapter_base_path(directory)
    if base and os.path.isdir(base) and os.path.abspath(base) != os.path.abspath(directory):
        found += [f"the adapter's base {base}: {entry}" for entry in custom_code(base)]
    return found


def adapter_base_path(directory: str) -> str | None:
    """The base model a LoRA adapter directory names, read as plain JSON (nothing of PEFT runs)."""
    try:
        with open(os.path.join(directory, "adapter_config.json"), encoding="utf-8") as f:
            return json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None


def check_custom_code(directory: str, trust_remote_code: bool) -> None:
    """Refuse, in one line, a checkpoint that would run its own code, unless the user passed --trust_remote_code."""
    if trust_remote_code or not os.path.isdir(directory):
        return
    found = custom_code(directory)
    if found:
        raise UserError(f"{directory} ships its own Python code ({'; '.join(found)}); qwen-tune runs none of it. "
                        f"Pass --trust_remote_code True only if you trust where it came from")


def check_weights_format(directory: str, allow_pickle: bool) -> None:
    """Safetensors only: pickle weights can run code when loaded, so they need --allow_pickle_weights."""
    if allow_pickle or not os.path.isdir(directory):
        return
    names = os.listdir(directory)
    if any(n.endswith(".safetensors") for n in names):
        return
    pickles = sorted(n for n in names if n.endswith(PICKLE_WEIGHTS) and n != "training_args.bin")
    if pickles:
        raise UserError(
            f"{directory} has only pickle weights ({', '.join(pickles[:3])}), which can run code when loaded. "
            f"Convert them to safetensors, or pass --allow_pickle_weights if you trust where they came from."
        )


def check_checkpoint(directory: str, *, trust_remote_code: bool = False, allow_pickle: bool = False) -> None:
    """Before a model or adapter directory (and an adapter's base) is loaded: a finished result, no code, no pickles."""
    check_finished(directory)
    check_custom_code(directory, trust_remote_code)
    check_weights_format(directory, allow_pickle)
    base = adapter_base_path(directory)
    if base and os.path.isdir(base) and os.path.abspath(base) != os.path.abspath(directory):
        check_finished(base)
        check_weights_format(base, allow_pickle)


# what a training checkpoint's pickles may name: tensors, numpy arrays (RNG states), DeepSpeed's own classes and
# plain containers; anything else (os.system, builtins.eval, a class of the file's author) could run code on load
SAFE_PICKLE_MODULES = ("torch", "numpy", "deepspeed", "collections")
SAFE_PICKLE_BUILTINS = ("builtins.set", "builtins.frozenset", "builtins.slice", "builtins.complex", "builtins.bytearray")


def check_checkpoint_pickles(directory: str) -> None:
    """Before resuming: every pickle of the checkpoint (optimizer, scheduler, RNG states, DeepSpeed shards) names
    only what a training checkpoint holds. Read without unpickling (torch's scanner), so nothing runs either way."""
    from pathlib import Path

    from torch.serialization import get_unsafe_globals_in_checkpoint

    for path in sorted(p for p in Path(directory).rglob("*") if p.suffix in PICKLE_WEIGHTS and p.is_file()):
        try:
            named = get_unsafe_globals_in_checkpoint(path)
        except (ValueError, RuntimeError, OSError) as e:
            raise UserError(f"{path} is not a file torch.save wrote ({str(e).splitlines()[0]}); resume from another "
                            f"checkpoint, or remove this one") from e
        unsafe = [g for g in named if g.split(".")[0] not in SAFE_PICKLE_MODULES and g not in SAFE_PICKLE_BUILTINS]
        if unsafe:
            raise UserError(f"{path} holds a pickle that would run {', '.join(unsafe[:3])} when loaded; qwen-tune "
                            f"loads no such file. Resume from another checkpoint, or remove this one")
