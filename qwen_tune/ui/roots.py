"""The directories the page may read and write (`qwen-tune ui --root`), and what it finds in them.

Every path the page sends is resolved (symbolic links followed) and must lie under one of them; a relative path is
taken from the first. A model named as `org/name` that is not a directory there is read from the local Hugging Face
cache, as the commands do (read-only; nothing is downloaded).
"""

from __future__ import annotations

import os
import re

from pathlib import Path

from ..data.files import data_suffix
from ..data.mixture import split_weight
from ..errors import UserError
from ..train import ownership

HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")
MAX_DEPTH, MAX_FOUND = 4, 300  # how far listings look below each root


class Roots:
    def __init__(self, directories: list[str]):
        self.directories = [os.path.realpath(os.path.expanduser(d)) for d in directories]

    @property
    def home(self) -> str:
        """Where relative paths start and runs are started (their working directory)."""
        return self.directories[0]

    def inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return any(real == d or real.startswith(d + os.sep) for d in self.directories)

    def path(self, value: str, what: str) -> str:
        """`value` as an absolute path under a root, or a UserError naming the option and the roots."""
        path = os.path.join(self.home, os.path.expanduser(value.strip()))
        if not self.inside(path):
            raise UserError(f"{what} {value}: outside the directories this page may use ({', '.join(self.directories)}); "
                            f"start qwen-tune ui with --root naming its directory too")
        return os.path.realpath(path)

    def model(self, value: str, what: str) -> str:
        """A model: a directory under a root, or a name in the local Hugging Face cache (`Qwen/Qwen3-0.6B`)."""
        if HUB_NAME.match(value.strip()) and not os.path.exists(os.path.join(self.home, value.strip())):
            return value.strip()
        return self.path(value, what)

    def data(self, value: str, what: str) -> str:
        """A --data_path value: comma-separated files or directories, each with an optional `:weight`."""
        parts = []
        for part in value.split(","):
            written = os.path.join(self.home, os.path.expanduser(part.strip()))
            path, weight = split_weight(written)  # as --data_path reads it, from the first root
            parts.append(self.path(path, what) + (written[len(path):] if weight else ""))
        return ",".join(parts)

    def walk(self):
        """(directory, subdirectories, files) below every root, hidden directories and checkpoints skipped."""
        for root in self.directories:
            for directory, subdirs, files in os.walk(root):
                depth = directory[len(root):].count(os.sep)
                subdirs[:] = sorted(d for d in subdirs if not d.startswith((".", "checkpoint-", "__")) and depth < MAX_DEPTH
                                    and d not in ("node_modules", "runs"))
                yield directory, subdirs, sorted(files)

    def listing(self) -> dict[str, list[str]]:
        """Data files, recipe YAML files and models (directories with a config or an adapter) for the page's pickers."""
        found = {"data_files": [], "recipes": [], "models": []}
        for directory, _, files in self.walk():
            if "config.json" in files or "adapter_config.json" in files:
                found["models"].append(directory)
            for name in files:
                path = os.path.join(directory, name)
                if name.endswith((".yaml", ".yml")):
                    found["recipes"].append(path)
                elif data_suffix(Path(name)) and not ownership.OUTPUT_NAMES.match(name):  # a run's files are not data
                    found["data_files"].append(path)
            if all(len(v) >= MAX_FOUND for v in found.values()):
                break
        return {k: v[:MAX_FOUND] for k, v in found.items()}
