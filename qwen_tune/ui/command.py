"""The launch form as a `qwen-tune` command: every path checked against the roots and written absolute, so the
command shown runs the same from any directory; and the form saved as a `--config` YAML file."""

from __future__ import annotations

import os
import shlex

from ..cli import COMMANDS
from ..errors import UserError
from .roots import Roots

TRAINING = ("sft", "rm", "dpo", "orpo", "simpo", "kto", "distill", "ppo", "grpo")
# form fields that name paths, and how each is checked
MODELS = ("model_name_or_path", "policy", "reward_model", "teacher")
PATHS = ("output_dir", "config", "eval_data_path", "deepspeed", "tools")
DATA = ("data_path", "prompts")
# the form's model and data fields are these options for the RL methods, which start from an SFT policy and read prompts
RL_NAMES = {"model_name_or_path": "policy", "data_path": "prompts"}


def form_args(roots: Roots, body: dict) -> tuple[list[str], str]:
    """(qwen-tune arguments, output directory) of a launch form: {"method", "options": {name: value}, "extra": text}.
    Option mistakes are left to the command itself: a launch shows its message."""
    method = body.get("method")
    if method not in TRAINING:
        raise UserError(f"method {method!r}: choose one of {', '.join(TRAINING)}")
    args = [method]
    for name, value in (body.get("options") or {}).items():
        if value in (None, "", False):
            continue
        name = RL_NAMES.get(name, name) if method in ("ppo", "grpo") else name
        args += [f"--{name}", _checked(roots, name, str(value).strip() if not isinstance(value, bool) else "True")]
    try:
        extra = shlex.split(body.get("extra") or "")
    except ValueError as e:
        raise UserError(f"further options: {e}") from e
    for i, arg in enumerate(extra):
        name = extra[i - 1][2:] if i and extra[i - 1].startswith("--") else None
        args.append(_checked(roots, name, arg) if name and not arg.startswith("--") else arg)
    if "--output_dir" not in args:
        raise UserError("--output_dir is required: name the directory the run writes")
    return args, args[args.index("--output_dir") + 1]


def _checked(roots: Roots, name: str | None, value: str) -> str:
    if name in MODELS:
        return roots.model(value, f"--{name}")
    if name in DATA:
        return roots.data(value, f"--{name}")
    if name in PATHS or value.startswith(("/", "./", "../", "~")):
        return roots.path(value, f"--{name}" if name else "")
    return value


def save_yaml(roots: Roots, body: dict) -> str:
    """The form's options as `option: value` lines, for `qwen-tune METHOD --config FILE`; never over an existing file."""
    import yaml

    args, _ = form_args(roots, body)
    path = roots.path(body.get("path") or "", "YAML file")
    if not path.endswith((".yaml", ".yml")):
        raise UserError(f"{path}: a recipe file ends in .yaml")
    if os.path.exists(path):
        raise UserError(f"{path} exists; nothing was written. Choose another name")
    values, i = {}, 1
    while i < len(args):
        name = args[i][2:]
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            values[name], i = _yaml_value(args[i + 1]), i + 2
        else:
            values[name], i = True, i + 1
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "x", encoding="utf-8") as f:
        f.write(f"# qwen-tune {args[0]} --config {os.path.basename(path)}\n")
        yaml.safe_dump(values, f, sort_keys=False)
    return path


def _yaml_value(text: str):
    """A number or a boolean as such, anything else as text."""
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


assert set(TRAINING) <= set(COMMANDS)
