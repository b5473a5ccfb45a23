"""The first hour: the README's main job and every SFT recipe, run as the README shows on data/ with the embedded
model, learn the example conversations: reloaded in a fresh process, they answer as trained."""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess

import pytest

from helpers import DATA, ROOT, fresh_env, generate_in_fresh_process

pytestmark = pytest.mark.slow
ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


def first_replies(path: str) -> tuple[list[list[dict]], list[str]]:
    """Each conversation up to its first assistant turn, and that turn's text."""
    prompts, replies = [], []
    for conversation in json.load(open(path, encoding="utf-8")):
        messages = []
        for turn in conversation["conversations"]:
            if turn["from"] == "assistant":
                prompts.append(messages)
                replies.append(turn["value"])
                break
            messages.append({"role": ROLES[turn["from"]], "content": turn["value"]})
    return prompts, replies


def assert_answers_as_trained(out: str, adapter: bool) -> None:
    prompts, wanted = first_replies(os.path.join(DATA, "sft_example.json"))
    got = generate_in_fresh_process(out, prompts, adapter=adapter)
    same = [g.strip()[:20] == w[:20] for g, w in zip(got, wanted)]
    # all 12 on this machine; a greedy answer may flip on another CPU's rounding
    assert sum(same) >= 10, "\n".join(f"{'OK' if s else '--'} {g[:60]!r}" for s, g in zip(same, got))


def run(command: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=fresh_env(MASTER_PORT=str(random.randint(20000, 40000))))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_the_readme_main_job_learns_the_example_data(tmp_path):
    """The README's first command, as written there (only the output directory moved into the test's)."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    line = next(l for l in readme.splitlines() if l.startswith("pip install -e . ") and "finetune.py" in l)
    job = shlex.split(line.split("&&", 1)[1])
    out = str(tmp_path / "demo")
    job[job.index("--output_dir") + 1] = out
    proc = run(job)
    assert "Saved to" in proc.stderr
    assert_answers_as_trained(out, adapter=False)


@pytest.mark.parametrize("recipe, adapter", [
    ("finetune_lora_single_gpu.sh", True),
    ("finetune_qlora_single_gpu.sh", True),
    ("finetune_ds.sh", False),
    ("finetune_lora_ds.sh", True),
    ("finetune_qlora_ds.sh", True),
])
def test_sft_recipe_on_the_embedded_model_answers_as_trained_after_a_reload(recipe, adapter, tmp_path):
    out = str(tmp_path / "out")
    run(["sh", os.path.join("recipes", recipe), "-d", "data/sft_example.json", "-o", out])
    saved = json.load(open(os.path.join(out, "training_args.json")))
    assert saved["num_train_epochs"] == (100 if adapter else 60)  # the YAML's embedded_model section applied (no -m)
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors" if adapter else "model.safetensors"))
    assert_answers_as_trained(out, adapter)
