"""SFT data at scale: the old in-memory path against the memory-mapped tokens cache (data/cache.py).

    nice python bench/data_scale.py [--n 1000000] [--old_n 100000] [--scratch /tmp/qwen_tune_data_scale]

Generates N varied conversations (about 300 tokens each, JSONL) and a smaller file of `--old_n` with a few
malformed lines, then measures, each in a fresh process (peak resident memory (PSS) of the process and its children,
sampled every 0.1 s with psutil):
- the old path (`load_sft_dataset`: every conversation and token as Python lists, one process) on `--old_n`;
- `qwen-tune preprocess --out DIR` on `--old_n` with 1 and 2 workers: conversations tokenized per second;
- the malformed file: every malformed sample must be listed with file and line;
- `qwen-tune sft --max_steps 1` (embedded model) on N, twice: the first run tokenizes into the cache, the second
  starts from it; time to the first training step, and peak memory;
- the data path alone from the cache (load_tokens in a process that has imported it and loaded the tokenizer);
- the same sft on 1,000 conversations: what a run costs whatever the data.
Writes a Markdown table to bench/data_scale.md (with the command that produced it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the model learns to answer questions about data files tokens memory training steps cache python code "
         "function returns value list dictionary string error line record batch worker process arrow parquet "
         "weather city river mountain music history science garden recipe kitchen travel train station").split()
CHINESE = "我们今天学习如何用数据训练模型并且检查每一行的错误"


def sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    if rng.random() < 0.2:
        text += " " + "".join(rng.choice(CHINESE) for _ in range(rng.randint(5, 30)))
    return text[0].upper() + text[1:] + "."


def conversation(rng: random.Random, i: int) -> dict:
    """About 300 tokens: a system turn sometimes, one to three user/assistant exchanges."""
    messages = [{"role": "system", "content": "You are a careful assistant."}] if rng.random() < 0.3 else []
    turns = rng.randint(1, 3)
    for _ in range(turns):
        messages.append({"role": "user", "content": sentence(rng, rng.randint(10, 40))})
        messages.append({"role": "assistant", "content": sentence(rng, rng.randint(180, 300) // turns)})
    return {"id": f"c{i}", "messages": messages}


MALFORMED = [
    '{"id": "bad-json", "messages": [',
    '{"id": "no-assistant", "messages": [{"role": "user", "content": "hi"}]}',
    '{"id": "bad-role", "messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "a"}]}',
    '{"id": "empty", "messages": []}',
    '[1, 2, 3]',
    '{"id": "c5", "messages": [{"role": "user", "content": "duplicate id"}, {"role": "assistant", "content": "a"}]}',
]


def generate(path: Path, n: int, malformed: bool) -> list[int]:
    """Write n conversations (plus the MALFORMED lines spread through the file); returns those lines' numbers."""
    rng, bad_at = random.Random(n), []
    spots = sorted(random.Random(1).sample(range(10, n), len(MALFORMED))) if malformed else []
    with open(path, "w", encoding="utf-8") as f:
        line = 0
        for i in range(n):
            f.write(json.dumps(conversation(rng, i), ensure_ascii=False) + "\n")
            line += 1
            while spots and spots[0] == i:
                spots.pop(0)
                f.write(MALFORMED[len(bad_at)] + "\n")
                line += 1
                bad_at.append(line)
    return bad_at


def started_training(r: dict) -> str:
    """'T s to step 1 (training began at S s)': S is T less the Trainer's own train_runtime of that one step."""
    runtime = re.search(r"train_runtime ([\d.]+)", r["stdout"])
    began = f" (training began at {r['first_step'] - float(runtime.group(1)):.1f} s)" if runtime else ""
    return f"{r['first_step']:.1f} s to step 1{began}"


def measure(cmd: list[str], env: dict, first_step: str | None = None) -> dict:
    """Run cmd; wall seconds, peak PSS of it and its children (MB), seconds until `first_step` appears in its output
    (stdout and stderr together)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    parent, peak, seen, err = psutil.Process(proc.pid), 0, {}, []

    def read_stderr():
        for line in proc.stdout:
            err.append(line)
            if first_step and first_step in line and "at" not in seen:
                seen["at"] = time.monotonic() - start

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            # PSS: a forked worker's pages shared with its parent are counted once, not once per process
            rss = sum(p.memory_full_info().pss for p in [parent] + parent.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    reader.join()
    out = "".join(err)
    return {"seconds": time.monotonic() - start, "peak_mb": peak / 2**20, "rc": proc.returncode, "stdout": out,
            "stderr": "".join(err), "first_step": seen.get("at")}


OLD = """
import sys
sys.path.insert(0, "tests")  # the in-memory pipeline, kept as the cache's reference
from qwen_tune.data.chat_format import resolve_format
from in_memory_sft import load_sft_dataset
from qwen_tune.models.tokenizer import load_tokenizer
samples, report = load_sft_dataset(sys.argv[1], resolve_format(load_tokenizer()), 512)
print(report.summary())
"""


DATA_PATH_ONLY = """
import sys, time
import datasets  # imported by every sft run before its data (through transformers' Trainer)
from qwen_tune.data.cache import load_tokens
from qwen_tune.options import FormatOptions, set_chat_format
from qwen_tune.models.model import resolve_model_path
from qwen_tune.models.tokenizer import load_tokenizer
fmt = set_chat_format(load_tokenizer(resolve_model_path(None)), FormatOptions())  # what sft uses: the same cache key
start = time.monotonic()
rows, report = load_tokens(sys.argv[1], fmt, 512)
print(f"data path: {time.monotonic() - start:.2f} s for {len(rows):,} rows")
"""


class Progress:
    """The rows and notes of the stages measured so far, kept in SCRATCH/progress.json: `--resume` skips those
    stages (and the generation), so a run cut short goes on where it stopped."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.stages = json.loads(path.read_text()) if resume and path.exists() else {}

    def done(self, stage: str) -> bool:
        return stage in self.stages

    def add(self, stage: str, rows=(), notes=(), **extra) -> None:
        self.stages[stage] = {"rows": [list(r) for r in rows], "notes": list(notes), **extra}
        self.path.write_text(json.dumps(self.stages, indent=1))
        for line in list(rows) + list(notes):
            print(line, flush=True)

    def rows(self) -> list:
        return [r for s in self.stages.values() for r in s["rows"]]

    def notes(self) -> list:
        return [n for s in self.stages.values() for n in s["notes"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="conversations for the cached path's training runs")
    p.add_argument("--old_n", type=int, default=100_000, help="conversations for the old path and the per-worker rates")
    p.add_argument("--scratch", default="/tmp/qwen_tune_data_scale", help="where the data and caches are written")
    p.add_argument("--resume", action="store_true", help="keep SCRATCH and skip the stages already measured there")
    a = p.parse_args()
    scratch = Path(a.scratch)
    if not a.resume:
        shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True, exist_ok=True)
    progress = Progress(scratch / "progress.json", a.resume)
    env = dict(os.environ, QWEN_TUNE_CACHE=str(scratch / "cache"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT))
    small, bad, big = scratch / f"small_{a.old_n}.jsonl", scratch / "malformed.jsonl", scratch / f"big_{a.n}.jsonl"
    cli = [sys.executable, "-m", "qwen_tune"]
    if not progress.done("generate"):
        t = time.monotonic()
        generate(small, a.old_n, False)
        bad_lines = generate(bad, a.old_n, True)
        generate(big, a.n, False)
        progress.add("generate", bad_lines=bad_lines,
                     notes=[f"generated in {time.monotonic() - t:.0f} s: {big.stat().st_size / 2**20:,.0f} MB of JSONL for {a.n:,}"])
    bad_lines = progress.stages["generate"]["bad_lines"]

    if not progress.done("old"):
        r = measure([sys.executable, "-c", OLD, str(small)], env)
        assert r["rc"] == 0, r["stderr"][-3000:]
        tokens = re.search(r"(\d+) tokens", r["stdout"]).group(1)
        progress.add("old", rows=[("old in-memory path (load_sft_dataset), 1 process", f"{a.old_n:,}",
                                   f"{r['seconds']:.1f} s (data loaded)", f"{a.old_n / r['seconds']:,.0f}", f"{r['peak_mb']:,.0f}")],
                     notes=[f"{a.old_n:,} conversations = {int(tokens):,} tokens (model_max_length 512)"])

    for workers in (1, 2):
        if not progress.done(f"workers {workers}"):
            r = measure(cli + ["preprocess", "--data", str(small), "--out", str(scratch / f"tokens_{workers}"),
                               "--preprocessing_num_workers", str(workers)], env)
            assert r["rc"] == 0, r["stderr"][-3000:]
            rate = re.search(r"at ([\d,]+)/s", r["stderr"]).group(1)
            progress.add(f"workers {workers}", rows=[(f"new: preprocess --out DIR, {workers} worker(s)", f"{a.old_n:,}",
                                                      f"{r['seconds']:.1f} s (all)", rate, f"{r['peak_mb']:,.0f}")])

    if not progress.done("malformed"):
        r = measure(cli + ["preprocess", "--data", str(bad), "--out", str(scratch / "tokens_bad")], env)
        listed = [n for n in bad_lines if f"{bad}:{n}" in r["stderr"]]
        progress.add("malformed", notes=[f"malformed file: exit {r['rc']}, {len(listed)} of the {len(bad_lines)} malformed "
                                         f"samples listed with file:line ({', '.join(map(str, bad_lines))}), in {r['seconds']:.1f} s"])

    def sft_on(data: Path) -> list[str]:
        return cli + ["sft", "--data_path", str(data), "--output_dir", str(scratch / "out"), "--max_steps", "1", "--report_to", "none",
                      "--save_strategy", "no", "--overwrite_output_dir", "True", "--preprocessing_num_workers", "2"]

    for run in ("first run: tokenizes into the cache", "second run: from the cache"):
        if progress.done(run):
            continue
        r = measure(sft_on(big), env, first_step="step 1/1")
        assert r["rc"] == 0, r["stderr"][-3000:]
        rate = re.search(r"at ([\d,]+)/s", r["stderr"])
        progress.add(run, rows=[(f"new: sft --max_steps 1, {run}", f"{a.n:,}", started_training(r), "",
                                 f"{r['peak_mb']:,.0f}")],
                     notes=[f"first sft run tokenized {a.n:,} conversations at {rate.group(1) if rate else '?'}/s with 2 workers"]
                     if "first" in run else [])

    if not progress.done("data path"):
        r = measure([sys.executable, "-c", DATA_PATH_ONLY, str(big)], env)
        assert r["rc"] == 0, r["stderr"][-3000:]
        assert "loaded from the cache" in r["stderr"], r["stderr"][-3000:]  # the same key as the sft runs
        took = re.search(r"data path: ([\d.]+) s", r["stdout"]).group(1)
        progress.add("data path", rows=[("new: the data path alone from the cache (key, checksum, open, report; after imports "
                                         "and the tokenizer)", f"{a.n:,}", f"{took} s", "", f"{r['peak_mb']:,.0f}")])

    if not progress.done("baseline"):
        tiny = scratch / "tiny_1000.jsonl"
        generate(tiny, 1000, False)
        measure(sft_on(tiny), env)  # tokenize it once, so that the timed run starts from the cache like the second run
        r = measure(sft_on(tiny), env, first_step="step 1/1")
        assert r["rc"] == 0, r["stderr"][-3000:]
        progress.add("baseline", rows=[("baseline: the same sft on 1,000 conversations, from the cache (model, optimizer, one "
                                        "packed batch)", "1,000", started_training(r), "", f"{r['peak_mb']:,.0f}")])

    table = ["| run | conversations | time | conversations/s | peak memory (PSS, MB, with children) |", "|---|---|---|---|---|"]
    table += ["| " + " | ".join(r) + " |" for r in progress.rows()]
    text = (f"# SFT data at scale\n\n`nice python bench/data_scale.py --n {a.n} --old_n {a.old_n}` "
            f"({os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GB)\n\n" + "\n".join(table)
            + "\n\n" + "\n".join(f"- {n}" for n in progress.notes()) + "\n")
    (ROOT / "bench" / "data_scale.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
