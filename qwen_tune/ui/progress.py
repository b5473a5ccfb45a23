"""What an output directory says about its run, read from the files the run writes (nothing else is needed: runs
started from a terminal are read the same way as those started by the page).

Training commands append every log line to `train_log.jsonl` (GRPO `grpo_log.jsonl`, PPO `ppo_log.jsonl`), each
start (fresh or resumed) first a `begin` record with the command; report.py writes them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..report import loss_series

LOG_NAMES = ("train_log.jsonl", "grpo_log.jsonl", "ppo_log.jsonl")


@dataclass
class Progress:
    step: int = 0
    max_steps: int | None = None
    eta_seconds: float | None = None
    tokens_per_second: float | None = None
    loss: float | None = None
    argv: list[str] | None = None  # the command of the latest start, as sys.argv
    started: float | None = None  # time of the latest start's begin record
    series: dict[str, list[list[float]]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)  # the records as the terminal showed them


def read_progress(out: str) -> Progress:
    """The latest state of the run in `out`: after a resume, the records of the steps it lost are dropped."""
    records, begin = [], None
    for record in _records(out):
        if record.get("event") == "begin":
            records = [r for r in records if r.get("step", 0) <= record.get("step", 0)]
            begin = record
        else:
            records.append(record)
    progress = Progress(series=loss_series(records), lines=[_line(r) for r in records])
    if begin is not None:
        progress.argv, progress.started, progress.step = begin.get("argv"), begin.get("time"), begin.get("step", 0)
        progress.max_steps = begin.get("max_steps")
    if records:
        last = records[-1]
        progress.step = max(progress.step, last.get("step", 0))
        progress.max_steps = last.get("max_steps", progress.max_steps)
        done = [r for r in records if r.get("time") and begin and r.get("step", 0) > begin.get("step", 0)]
        if done and progress.max_steps and done[-1]["step"] > begin["step"]:
            per_step = (done[-1]["time"] - begin["time"]) / (done[-1]["step"] - begin["step"])
            progress.eta_seconds = round(per_step * max(progress.max_steps - progress.step, 0), 1)
        speeds = [r["tokens_per_second"] for r in records if "tokens_per_second" in r]
        progress.tokens_per_second = speeds[-1] if speeds else None
    if "loss" in progress.series:
        progress.loss = progress.series["loss"][-1][1]
    return progress


def _records(out: str) -> list[dict]:
    path = next((os.path.join(out, n) for n in LOG_NAMES if os.path.isfile(os.path.join(out, n))), None)
    if path is None:
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:  # the line being written
                break
    return records


def _line(record: dict) -> str:
    values = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                       if k not in ("step", "max_steps", "time"))
    return f"step {record.get('step')}/{record.get('max_steps', '?')}  {values}"
