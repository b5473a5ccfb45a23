"""The training and evaluation sets of a run: `--eval_data_path`, or `--val_size` held out of the training data."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError


@dataclass
class HeldOut:
    """What `--val_size` took out of the training data for evaluation: reproducible from the seed, and named.
    `of`: the distinct samples it was drawn from; `rows`: the training rows, a weighted mixture's copies included;
    `copies`: the held-out samples' copies, which left training with them (the evaluation holds each sample once)."""

    val_size: float
    seed: int
    of: int
    ids: list = field(default_factory=list)
    rows: int | None = None
    copies: int = 0

    def summary(self, name: str = "eval") -> str:
        shown = ", ".join(map(str, self.ids[:10])) + (f" ... and {len(self.ids) - 10} more" if len(self.ids) > 10 else "")
        distinct = "distinct " if self.rows not in (None, self.of) else ""
        copies = (f"; their {self.copies} cop{'y' if self.copies == 1 else 'ies'} in the mixture left training too"
                  if self.copies else "")
        return (f"{name}: {len(self.ids)} of {self.of} {distinct}training samples held out for evaluation "
                f"(--val_size {self.val_size:g}, seed {self.seed}){copies}: {shown}")


def held_out_count(val_size: float, n: int) -> int:
    """A fraction in (0, 1) of `n` (at least one sample), or a count >= 1; at least one sample must stay for training."""
    if val_size < 0 or (val_size >= 1 and val_size != int(val_size)):
        raise UserError(f"--val_size {val_size:g}: expected a fraction between 0 and 1 or a whole number of samples")
    k = max(1, round(n * val_size)) if val_size < 1 else int(val_size)
    if k >= n:
        raise UserError(f"--val_size {val_size:g} would hold out {k} of the {n} training samples; leave some to train on")
    return k


_COPY = re.compile(r"#\d+$")  # a weighted mixture's repeated copies: ID#2, ID#3, ... (see mixture.py)


def _by_original(ids: list[str]) -> dict[str, list[int]]:
    """Positions of each sample and its mixture copies, so a copy never lands on the other side of the split."""
    known, groups = set(ids), {}
    for i, sid in enumerate(ids):
        base = _COPY.sub("", sid)
        groups.setdefault(base if base != sid and base in known else sid, []).append(i)
    return groups


def hold_out(samples, val_size: float, seed: int):
    """(train, held out, HeldOut) from a list of encoded samples or a `datasets.Dataset` with an id column.
    `--val_size` counts distinct samples: a held-out sample is evaluated once, and all its copies leave training."""
    n = len(samples)
    groups = list(_by_original([s.id for s in samples] if isinstance(samples, list) else samples["id"][:]).values())
    picked = sorted(random.Random(seed).sample(range(len(groups)), held_out_count(val_size, len(groups))))
    held = sorted(groups[g][0] for g in picked)  # the first occurrence: the original, not a copy
    leaving = {i for g in picked for i in groups[g]}
    keep = [i for i in range(n) if i not in leaving]
    if isinstance(samples, list):
        train, evaluation = [samples[i] for i in keep], [samples[i] for i in held]
        ids = [s.id for s in evaluation]
    else:
        train, evaluation = samples.select(keep), samples.select(held)
        ids = evaluation["id"][:]
    return train, evaluation, HeldOut(val_size, seed, len(groups), ids, rows=n, copies=len(leaving) - len(held))


def load_splits(data_args, seed: int, load: Callable, log: Callable):
    """(train, train report, evaluation or None, its report or None); `load(paths)` -> (samples, report)."""
    train, train_report = load(data_args.data_path)
    log(train_report.summary("train"))
    evaluation, eval_report = None, None
    if data_args.eval_data_path:
        evaluation, eval_report = load(data_args.eval_data_path)
        log(eval_report.summary("eval"))
    elif data_args.val_size:
        train, evaluation, eval_report = hold_out(train, data_args.val_size, seed)
        log(eval_report.summary("eval"))
    return train, train_report, evaluation, eval_report
