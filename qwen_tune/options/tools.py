"""Options of the tools that use a model or data without training (chat, eval, score, preprocess, merge): the same
groups and flags as the training commands where they mean the same thing."""

from __future__ import annotations

from dataclasses import dataclass, field

from .groups import Frozen


@dataclass
class TrustOptions(Frozen):
    _argument_group_name = "trust"
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the checkpoint's own Python code; off unless you trust where it came from."}
    )


def required(values: dict, group: str, *names: str) -> None:
    """A tool's inputs without which it cannot run, each one line."""
    from ..errors import UserError

    for name in names:
        if values[group][name] in (None, ""):
            raise UserError(f"--{name} is required (see qwen-tune {group} --help)")
