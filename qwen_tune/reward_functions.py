"""Rewards computed by a user's Python function (`--reward_fn module:function` or `file.py:function`).

Called as f(prompt_messages, response_text) -> float; anything that is not a finite number is an
error naming the prompt, so a broken rule never trains the policy on NaN.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path

from .errors import UserError


def load_reward_fn(spec: str):
    """`module:function` or `path/to/file.py:function` -> the callable."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise UserError(f"--reward_fn {spec}: expected module:function or file.py:function")
    try:
        if target.endswith(".py"):
            if not Path(target).is_file():
                raise UserError(f"--reward_fn {spec}: no such file {target}")
            module_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as e:
        raise UserError(f"--reward_fn {spec}: cannot import {target}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"--reward_fn {spec}: {target} has no function {name}")
    return fn


def call_reward_fn(fn, spec: str, prompt_id: str, messages: list[dict], text: str) -> float:
    value = fn(messages, text)
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = float("nan")
    if not math.isfinite(value):
        raise UserError(f"--reward_fn {spec} returned {value!r} for prompt {prompt_id}; it must return a finite number")
    return value
