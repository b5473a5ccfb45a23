"""A command's options as plain data (flags, value kinds, choices, its --help text), so that `--help` and every
option mistake (an unknown flag, a bad value, an option of another command) are answered before torch and
transformers are imported, which takes 10 s and more on a loaded 2-core machine.

transformers' TrainingArguments and TRL's configs are known only by importing them, so the specs are made from the
real parsers: shipped in assets/option_specs.json for the transformers and TRL of constraints.txt (a test keeps
them equal to the parsers; `python -m qwen_tune.options.spec` writes them anew), and under other versions made by a
command's first run and kept in the cache directory. A spec only answers early: the real parser still parses
every run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import metadata
from pathlib import Path

from ..errors import UserError
from .parse import USAGE, expand_argv, unknown_options

SHIPPED = Path(__file__).parent.parent / "assets" / "option_specs.json"
LIBRARIES = ("transformers", "trl")  # the libraries whose dataclasses are options


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _cached(command: str) -> Path:
    from ..help import cache_key
    from ..paths import cache_dir

    return cache_dir() / "options" / f"{command}-{cache_key(command, 'options')}.json"


def spec_for(command: str) -> dict | None:
    """The shipped spec when the installed libraries are those it was made from, else the one a first run kept."""
    try:
        shipped = json.loads(SHIPPED.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        shipped = {}
    if shipped.get("libraries") == library_versions() and command in shipped.get("commands", {}):
        return shipped["commands"][command]
    try:
        return json.loads(_cached(command).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def remember(command: str, groups: dict[str, type], parser) -> None:
    """Keep the spec of a parser just built, when none answers for these library versions yet."""
    if spec_for(command) is not None:
        return
    path = _cached(command)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(describe(command, groups, parser)), encoding="utf-8")
        os.replace(tmp, path)  # a concurrent run never reads half a file
    except OSError:
        pass  # a read-only cache: the next run imports the libraries again, nothing worse


def _json_safe(value):
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _kind(action) -> str:
    """How a value is checked: as the parser's own type function would take it ("text": taken as it is here)."""
    if action.choices is not None:
        return "choice"
    name = getattr(action.type, "__name__", "")
    return {"int": "int", "float": "float", "string_to_bool": "bool"}.get(name, "text")


def describe(command: str, groups: dict[str, type], parser=None) -> dict:
    """The spec of a command's parser (parse.parser_for) and its --help text (help.own_options)."""
    from ..help import own_options
    from .parse import known_flags, parser_for

    parser = parser or parser_for(groups.values(), prog=f"qwen-tune {command}")
    options = []
    for action in parser._actions:  # argparse has no public list of a parser's options
        if isinstance(action, argparse._HelpAction) or action.dest == "config":
            continue
        option = {"flags": list(action.option_strings), "dest": action.dest, "kind": _kind(action), "nargs": action.nargs,
                  "const": _json_safe(action.const), "choices": None if action.choices is None else [str(c) for c in action.choices]}
        options.append({key: value for key, value in option.items() if value is not None})
    return {"help": own_options(tuple(groups.values()), f"qwen-tune {command}"), "known": known_flags(groups),
            "options": options}


def _truth(value: str) -> bool:
    """transformers.hf_argparser.string_to_bool, word for word (importing it imports torch)."""
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(
        f"Truthy value expected: got {value} but expected one of yes/no, true/false, t/f, y/n, 1/0 (case insensitive).")


_truth.__name__ = "string_to_bool"
TYPES = {"int": int, "float": float, "bool": _truth, "choice": str, "text": None}


def check(command: str, spec: dict, argv: list[str]) -> None:
    """Refuse what the command's parser would refuse, in its words: argparse's message and exit 2 for a bad value,
    UserError for a flag the command does not take."""
    parser = argparse.ArgumentParser(prog=f"qwen-tune {command}", usage=USAGE, allow_abbrev=False, add_help=False)
    parser.add_argument("--config")
    for option in spec["options"]:
        nargs = option.get("nargs")
        if nargs == 0:  # --no_FLAG: store_false
            kwargs = {"dest": option["dest"], "action": "store_const", "const": option.get("const")}
        else:
            kwargs = {"dest": option["dest"], "nargs": nargs, "type": TYPES[option["kind"]], "choices": option.get("choices")}
            if nargs == "?":
                kwargs["const"] = option.get("const")
        parser.add_argument(*option["flags"], **kwargs)
    _, extra = parser.parse_known_args(expand_argv(argv))
    if extra:
        raise UserError(unknown_options(extra, command, spec["known"]))


def main() -> None:
    """Write assets/option_specs.json from the installed libraries' parsers."""
    import importlib

    from ..cli import COMMANDS

    commands = {name: describe(name, importlib.import_module(module).METHOD.groups) for name, (module, _) in COMMANDS.items()}
    lines = [f'{{"libraries": {json.dumps(library_versions())}, "commands": {{']
    for i, (name, spec) in enumerate(commands.items()):  # an option a line: a change reads as one in a diff
        options = ",\n".join(f"   {json.dumps(option)}" for option in spec["options"])
        lines.append(f' {json.dumps(name)}: {{"help": {json.dumps(spec["help"])}, "known": {json.dumps(spec["known"])},\n'
                     f'  "options": [\n{options}]}}' + ("," if i + 1 < len(commands) else ""))
    SHIPPED.write_text("\n".join(lines) + "}}\n", encoding="utf-8")
    print(f"wrote {SHIPPED} for {library_versions()}", file=sys.stderr)


if __name__ == "__main__":
    main()
