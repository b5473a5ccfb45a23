"""argv (and `--config FILE.yaml`) into a command's option values, group by group. Nothing runs and nothing is
built here but the values: `resolve()` decides the dependent ones, `prepare_run()` acts on them."""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

from ..errors import UserError
from .groups import group_of

# Spellings from the seed's scripts and transformers 4 that we keep accepting.
OLD_SPELLINGS = {"--evaluation_strategy": "--eval_strategy"}

EMBEDDED_SECTION = "embedded_model"  # YAML options for the embedded tiny model (and models trained from it)
MODEL_FLAGS = ("model_name_or_path", "policy")  # where each subcommand names the model it starts from
EMBEDDED_SHAPE = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
USAGE = "%(prog)s [--config FILE.yaml] [--option VALUE ...]"


def is_embedded_model(model: str | None) -> bool:
    """No model, or a directory holding the embedded model or one trained from it (its tiny shape; an adapter's base):
    the demo settings of a YAML's `embedded_model:` section apply to those, so `sh recipes/train_dpo.sh -m output/demo`
    learns visibly too. A hub id or a real checkpoint is never the embedded model."""
    import json

    if not model:
        return True
    adapter, config = Path(model, "adapter_config.json"), Path(model, "config.json")
    try:
        if adapter.is_file():
            return is_embedded_model(json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path"))
        if not config.is_file():
            return False
        mine = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # unreadable: not ours to judge here; loading the model reports it
    reference = json.loads(Path(__file__).parent.parent.joinpath("assets", "embedded_model_config.json").read_text())
    return all(mine.get(key) == reference[key] for key in EMBEDDED_SHAPE)


def _flag_value(argv: list[str], name: str) -> str | None:
    """The last value given to --name (as `--name VALUE` or `--name=VALUE`), or None."""
    value = None
    for i, a in enumerate(argv):
        if a == "--" + name and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
    return value


def _config_values(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"--config {path}: {e}") from e
    if not isinstance(values, dict) or not isinstance(values.get(EMBEDDED_SECTION, {}), dict):
        raise UserError(f"--config {path}: expected a mapping of option: value ({EMBEDDED_SECTION}: a mapping too)")
    return values


def _values_to_argv(values: dict) -> list[str]:
    argv = []
    for key, value in values.items():
        flag = "--" + str(key)
        if isinstance(value, list):
            argv += [flag] + [str(v) for v in value]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def _respell(arg: str) -> str:
    flag, sep, value = arg.partition("=")
    return OLD_SPELLINGS.get(flag, flag) + sep + value


def expand_argv(argv: list[str]) -> list[str]:
    """Put a YAML config's options first so that command-line flags (parsed later) win. Its `embedded_model:`
    section (the tiny model's demo settings) comes in between when the run starts from the embedded model (which
    is decided from the model directory's config.json, the one file read here besides the YAML)."""
    argv = [_respell(a) for a in argv]
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UserError("--config needs a YAML file")
        values = _config_values(argv[i + 1])
        embedded = values.pop(EMBEDDED_SECTION, {})
        rest = argv[:i] + argv[i + 2 :]
        models = [_flag_value(rest, f) or values.get(f) for f in MODEL_FLAGS]
        demo = is_embedded_model(next((str(m) for m in models if m), None))
        argv = _values_to_argv(values) + (_values_to_argv(embedded) if demo else []) + rest
    return argv


def parser_for(groups, prog: str | None = None):
    """The argparse parser of these option groups (each a --help group), plus --config."""
    import argparse

    from transformers import HfArgumentParser

    parser = HfArgumentParser(list(groups), prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
                              usage=USAGE)
    parser.add_argument("--config", help="YAML file of options (option: value); command-line flags override it.")
    return parser


def parse_values(command: str, groups: dict[str, type], argv: list[str] | None = None) -> dict[str, dict]:
    """{group name: {option: value}}, every option of every group present (defaults filled in)."""
    from . import spec

    argv = expand_argv(sys.argv[1:] if argv is None else argv)
    parser = parser_for(groups.values(), prog=f"qwen-tune {command}")
    spec.remember(command, groups, parser)
    namespace, extra = parser.parse_known_args(argv)
    if extra:
        raise UserError(unknown_options(extra, command, known_flags(groups)))
    return {name: {f.name: getattr(namespace, f.name) for f in fields(cls) if f.init} for name, cls in groups.items()}


def known_flags(groups: dict[str, type]) -> list[str]:
    """--config and every option of these groups."""
    return ["--config"] + [f"--{f.name}" for cls in groups.values() for f in fields(cls) if f.init]


def unknown_options(extra: list[str], command: str, known: list[str]) -> str:
    """Name each flag the command does not take: an option of another command "has no effect on" this one; else the
    closest real ones (no abbreviations are accepted)."""
    import difflib

    lines = []
    for flag in (a.split("=")[0] for a in extra if a.startswith("--")):
        elsewhere = group_of(flag[2:])
        if elsewhere is not None:
            lines.append(f"{flag} has no effect on {command} (it is a {elsewhere._argument_group_name} option of other commands)")
            continue
        close = difflib.get_close_matches(flag, known, n=3, cutoff=0.75)
        lines.append(f"unknown option {flag}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    return "; ".join(lines or [f"unexpected arguments: {' '.join(extra)}"]) + " (see --help)"
