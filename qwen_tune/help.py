"""`qwen-tune COMMAND --help`: qwen-tune's own options, grouped (printed from options/spec.py's data), and
`--help-all` for the several hundred of transformers' TrainingArguments and TRL's configs.

Building a command's parser means importing torch, transformers and TRL (about 9 s on a 2-core CPU), so the
--help-all text is made once and kept under the cache directory, keyed by the contents of qwen-tune's own files
and the versions of those libraries: a change to either makes it anew.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import textwrap
from dataclasses import MISSING, fields
from importlib import metadata
from pathlib import Path

from .paths import cache_dir

LIBRARIES = ("torch", "transformers", "trl", "peft")


def wanted(argv: list[str]) -> str | None:
    """"--help-all", "--help" (also -h), or None."""
    if "--help-all" in argv:
        return "--help-all"
    return "--help" if "-h" in argv or "--help" in argv else None


def cache_key(command: str, which: str) -> str:
    """Changes with qwen-tune's own files and the versions of the libraries whose options it offers."""
    digest = hashlib.sha256(f"{command} {which}".encode())
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    for name in LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            digest.update(f"{name}={metadata.version(name)}".encode())
    return digest.hexdigest()[:16]


def print_help(command: str, which: str, make) -> None:
    """Print the cached text, or run `make()` (which prints the help and exits) once to make it."""
    path = cache_dir() / "help" / f"{command}-{cache_key(command, which)}.txt"
    if not path.is_file():
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            make()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(out.getvalue(), encoding="utf-8")
        os.replace(tmp, path)  # a concurrent first --help never reads half a file
    sys.stdout.write(path.read_text(encoding="utf-8"))


def own_options(dataclass_types: tuple, prog: str) -> str:
    """The options declared by qwen-tune's own dataclasses, grouped as `--help-all` groups them, each with its
    default; the library options are counted and pointed to."""
    lines = [f"usage: {prog} [--config FILE.yaml] [--option VALUE ...]", "",
             "qwen-tune's options, grouped; --help-all also lists every transformers / TRL option it accepts."]
    library = 0
    for cls in dataclass_types:
        ours = [f for f in fields(cls) if f.init and _declared_by_qwen_tune(cls, f.name)]
        library += sum(1 for f in fields(cls) if f.init) - len(ours)
        if not ours:
            continue
        lines += ["", f"{getattr(cls, '_argument_group_name', cls.__name__)}:"]
        for f in ours:
            default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else None)
            lines.append(f"  --{f.name} (default: {default})")
            lines.append(textwrap.fill(f.metadata.get("help", ""), width=100, initial_indent=" " * 6, subsequent_indent=" " * 6))
    if library:
        lines += ["", f"... and {library} more options of transformers' TrainingArguments and TRL's configs: {prog} --help-all"]
    lines.append("")
    return "\n".join(lines)


def _declared_by_qwen_tune(cls, name: str) -> bool:
    for klass in cls.__mro__:
        if name in vars(klass).get("__annotations__", {}):
            return klass.__module__.startswith("qwen_tune")
    return False
