"""Rewards computed by a user's Python function (`module:function` or `path/file.py:function`).

Two conventions: ppo's `--reward_fn`, f(prompt_messages, response_text) -> float, one sample at a
time; and TRL's, used by grpo's `--reward_funcs`: f(prompts, completions, **columns) -> list of
float or None, on a batch, with every extra field of the prompts file as a keyword list. Anything
that is not a finite number is an error naming the function and the prompt, so a broken rule never
trains the policy on NaN.

A reward function is the user's code running inside the training loop, so it is contained: `sys.exit()` or
KeyboardInterrupt inside it is an error naming it (not a silent exit 0 with no model), `--reward_timeout` seconds
stop a call that hangs, and SIGTERM during a call stops the run at once (the step cannot finish without its
rewards; the last complete checkpoint stays).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import math
import signal
import threading
from pathlib import Path

from ..errors import UserError


def load_reward_fn(spec: str, flag: str = "--reward_fn"):
    """`module:function` or `path/to/file.py:function` -> the callable."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise UserError(f"{flag} {spec}: expected module:function or file.py:function")
    try:
        if target.endswith(".py"):
            if not Path(target).is_file():
                raise UserError(f"{flag} {spec}: no such file {target}")
            module_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as e:
        raise UserError(f"{flag} {spec}: cannot import {target}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"{flag} {spec}: {target} has no function {name}")
    return fn


DEFAULT_TIMEOUT_S = 60.0  # a verifier (a regex, a unit test of a few lines) takes milliseconds


class _Stopped(Exception):
    """Raised inside a reward function by the timer or SIGTERM."""


@contextlib.contextmanager
def contained(what: str, timeout: float | None):
    """Run the body (one reward-function call, `what` names it and its prompts) with a time limit and with SIGTERM
    stopping it at once; SystemExit / KeyboardInterrupt / any exception from it become one UserError.
    The timer and handler need the main thread (where TRL and ppo call rewards); elsewhere only the errors are kept."""
    main = threading.current_thread() is threading.main_thread()
    previous_term = None

    def on_alarm(signum, frame):
        raise _Stopped(f"did not return within --reward_timeout {timeout:g} s")

    def on_term(signum, frame):
        if callable(previous_term):
            previous_term(signum, frame)  # the run's preemption handler still hears of it
        raise _Stopped("was running when SIGTERM arrived; the run stops at once (a step needs its rewards) and its "
                       "last complete checkpoint is kept")

    if main:
        previous_alarm = signal.signal(signal.SIGALRM, on_alarm)
        previous_term = signal.signal(signal.SIGTERM, on_term)
        if timeout:
            signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        yield
    except _Stopped as e:
        raise UserError(f"{what} {e}") from None
    except (SystemExit, KeyboardInterrupt) as e:
        raise UserError(f"{what} raised {type(e).__name__}{f' ({e})' if str(e) else ''}: a reward function must "
                        f"return its values, not end the run") from None
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{what} raised {type(e).__name__}: {e}") from e
    finally:
        if main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous_alarm)
            signal.signal(signal.SIGTERM, previous_term)


def call_reward_fn(fn, spec: str, prompt_id: str, messages: list[dict], text: str,
                   timeout: float | None = DEFAULT_TIMEOUT_S) -> float:
    with contained(f"--reward_fn {spec} (prompt {prompt_id})", timeout):
        value = fn(messages, text)
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = float("nan")
    if not math.isfinite(value):
        raise UserError(f"--reward_fn {spec} returned {value!r} for prompt {prompt_id}; it must return a finite number")
    return value


def checked_batch_reward(fn, spec: str, timeout: float | None = DEFAULT_TIMEOUT_S):
    """A reward function in TRL's convention, fn(prompts, completions, **columns) -> list[float | None], checked:
    an exception, a wrong number of values or a non-finite value stops the run naming the function, the prompt id
    and what it returned (None, "not applicable", is allowed: TRL leaves it out of the sum)."""

    @functools.wraps(fn)
    def reward(prompts, completions, **columns):
        ids = columns.get("id") or ["?"] * len(completions)
        with contained(f"--reward_funcs {spec} (prompts {', '.join(dict.fromkeys(map(str, ids)))})", timeout):
            values = fn(prompts, completions, **columns)
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            raise UserError(f"--reward_funcs {spec} returned {str(values)[:80]} for {len(completions)} completions; "
                            f"it must return a list with one number (or None) per completion")
        out = []
        for value, prompt_id in zip(values, ids):
            number = None if value is None else _as_number(value)
            if value is not None and not math.isfinite(number):
                raise UserError(f"--reward_funcs {spec} returned {value!r} for prompt {prompt_id}; "
                                f"expected a finite number (or None)")
            out.append(number)
        return out

    return reward


def _as_number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def load_batch_rewards(specs: str, timeout: float | None = DEFAULT_TIMEOUT_S) -> list:
    """`--reward_funcs a.py:f,module:g` -> the checked functions, in order."""
    return [checked_batch_reward(load_reward_fn(spec.strip(), "--reward_funcs"), spec.strip(), timeout)
            for spec in specs.split(",") if spec.strip()]


def weighted_batch_rewards(functions: list, weights: list[float] | None, conversations: list, texts: list[str]) -> list[float]:
    """Per completion: the sum of weight x f(prompts, completions, **columns) over the functions (None counts 0).
    `conversations`: the prompts' records (messages, id, columns); `texts`: one completion each."""
    if weights is not None and len(weights) != len(functions):
        raise UserError(f"--reward_weights has {len(weights)} values for {len(functions)} --reward_funcs")
    prompts = [c.messages for c in conversations]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    columns = {name: [c.columns.get(name) for c in conversations] for name in conversations[0].columns}
    totals = [0.0] * len(texts)
    for fn, weight in zip(functions, weights or [1.0] * len(functions)):
        for i, value in enumerate(fn(prompts, completions, id=[c.id for c in conversations], **columns)):
            totals[i] += weight * (value or 0.0)
    return totals
