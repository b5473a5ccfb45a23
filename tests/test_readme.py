"""The README's commands, run as written: every command in a code block of README.md runs, in the README's order,
from a copy of the repository (so `output/...` lands in the test's directory), on the embedded model, and does what
the README says of it. A command added to the README is run here too; the few that cannot run on this machine are
listed below with the reason and the test that covers them instead."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time

import pytest

from helpers import ROOT, assert_answers_as_trained, assert_finished_sft_output, free_port, fresh_env, library_noise, logprob_margins

pytestmark = pytest.mark.slow
README = os.path.join(ROOT, "README.md")
COMMAND_WORDS = ("pip", "python", "qwen-tune", "sh", "torchrun", "deepspeed")

NOT_RUN_HERE = {
    'pip install -e ".[test]" -c constraints.txt && python -m pytest': "the test suite itself: .ci/run runs exactly this",
    "NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 MASTER_PORT=6001 sh recipes/finetune_ds.sh -m /models/Qwen2.5-7B -d data.json -o out":
        "two machines and a real checkpoint; test_distributed runs two nodes on localhost",
    "NNODES=2 NODE_RANK=1 MASTER_ADDR=host0 MASTER_PORT=6001 sh recipes/finetune_ds.sh -m /models/Qwen2.5-7B -d data.json -o out":
        "two machines and a real checkpoint; test_distributed runs two nodes on localhost",
    "qwen-tune ui --root .": "a server that runs until stopped; tests/test_ui.py drives it in a real browser",
    "python bench/sft_throughput.py": "a benchmark of minutes; its results are bench/results.md",
    "python bench/sft_throughput.py --shape qwen2.5-0.5b --samples 24 --batch_size 4": "a benchmark of about an hour on 2 cores",
    "python bench/sft_throughput.py --shape qwen3.5-0.8b --samples 12 --batch_size 2 --loss_tokens 1024,4096 "
    "--rows qwen-tune,qwen-tune-checkpointing,trl-padded": "a benchmark of 10-20 minutes on 2 cores",
    "python bench/sft_throughput.py --shape qwen3.5-35b-a3b-4l32e --samples 12 --batch_size 2 --loss_tokens 1024":
        "a benchmark of 10-20 minutes on 2 cores",
    "qwen-tune sft --config recipes/finetune_lora.yaml --model_name_or_path /models/Qwen2.5-7B-Instruct --data_path my.json":
        "a real checkpoint; test_cli resolves every finetune YAML for a checkpoint name",
}


def readme_commands(text: str) -> list[str]:
    """Shell commands of the README's ```sh blocks and indented blocks, in order: continuation lines joined,
    comments dropped; console output (`qwen-tune sft: error: ...`, log lines) is not a command."""
    lines, commands, fence, i = text.splitlines(), [], None, 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else line.lstrip()[3:].strip()
        elif fence in ("sh", "bash") or (fence is None and re.match(r"    \S", line)):
            command = line.strip()
            while command.endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command[:-1].rstrip() + " " + lines[i].strip()
            command = re.sub(r"\s+#.*$", "", command)  # a trailing comment
            words = [w for w in command.split() if not re.fullmatch(r"[A-Z_]+=\S*", w)]
            if words and words[0] in COMMAND_WORDS and not any(w.endswith(":") for w in words[:2]):
                commands.append(command)
        i += 1
    return commands


def check(command: str, proc: subprocess.CompletedProcess, work: str) -> None:
    """What the README says each command does, beyond exiting 0."""
    out = lambda *p: os.path.join(work, "output", *p)  # noqa: E731
    if "--output_dir output/demo" in command:
        assert "Saved to" in proc.stderr
        assert_finished_sft_output(out("demo"), adapter=False)
        assert_answers_as_trained(out("demo"), adapter=False)
    elif command.startswith("qwen-tune chat") and "--prompt" in command:
        assert proc.stdout.startswith("I'm an assistant fine-tuned with qwen-tune"), proc.stdout
    elif "-o output/lora" in command:
        assert_finished_sft_output(out("lora"), adapter=True)
        assert_answers_as_trained(out("lora"), adapter=True)
    elif command.startswith("qwen-tune score"):  # every pair ranked right (--val_size 2 held two out of rm-lora's training)
        accuracy = json.loads(proc.stdout.strip().splitlines()[-1])["accuracy"]
        assert accuracy >= (0.8 if "rm-lora" in command else 1.0), proc.stdout
    elif "train_dpo.sh" in command:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from peft import AutoPeftModelForCausalLM

        dpo = out(command.split("-o ")[1].split()[0].split("/")[-1])
        pairs = os.path.join(work, "data", "preference_example.jsonl")
        tokenizer = AutoTokenizer.from_pretrained(dpo)
        before = logprob_margins(AutoModelForCausalLM.from_pretrained(out("demo")).eval(), tokenizer, pairs)
        loader = AutoPeftModelForCausalLM if "--use_lora True" in command else AutoModelForCausalLM
        after = logprob_margins(loader.from_pretrained(dpo).eval(), tokenizer, pairs)
        assert (after - before).mean() > 3 and (after > before).float().mean() >= 0.9, (before, after)
    elif " ppo " in command or "train_ppo.sh" in command:
        ppo_dir = command.split("--output_dir " if "--output_dir" in command else "-o ")[1].split()[0]
        log = [json.loads(l) for l in open(os.path.join(work, ppo_dir, "ppo_log.jsonl"))]
        assert log and all(math.isfinite(step["reward_mean"]) for step in log)
        from safetensors.torch import load_file

        assert os.path.isfile(os.path.join(work, ppo_dir, "value_head.safetensors"))
        trained, start = (load_file(os.path.join(d, "model.safetensors")) for d in (os.path.join(work, ppo_dir), out("demo")))
        assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in start.items()}  # complete, not shards
        assert all(trained[k].isfinite().all() for k in trained)
        if command.startswith("torchrun --nproc_per_node 2"):  # each rank samples 4 of the 8 prompts, scored together
            assert "DeepSpeed ZeRO stage 2 on 2 ranks" in proc.stderr and "8 prompts, 1 step of 8 rollouts" in proc.stderr
            assert [step["rollouts"] for step in log] == [8]
    elif " grpo " in command or "train_grpo.sh" in command:
        grpo_dir = command.split("--output_dir " if "--output_dir" in command else "-o ")[1].split()[0]
        assert os.path.isfile(os.path.join(work, grpo_dir, "model.safetensors"))
        assert "reward_final" in json.load(open(os.path.join(work, grpo_dir, "train_metrics.json")))
        if "train_grpo.sh" in command:  # the YAML's example reward functions, reading the data's `answer` column
            assert "16 prompts x 8 completions, rewards: exact_answer, number_only" in proc.stderr, proc.stderr[-3000:]
    elif command.startswith("qwen-tune eval"):
        assert json.loads(proc.stdout.strip().splitlines()[-1])["loss"] < 3.0, proc.stdout  # learned: the base is at 11.9
    elif "--help" in command:
        assert "--help-all" in proc.stdout or "sft" in proc.stdout


COMMANDS = readme_commands(open(README, encoding="utf-8").read())


def test_every_readme_command_is_run_here_or_has_a_reason():
    assert set(NOT_RUN_HERE) <= set(COMMANDS), set(NOT_RUN_HERE) - set(COMMANDS)  # no stale exception
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert 'pip install -q -e ".[test]" -c constraints.txt' in ci and "\npython -m pytest" in ci  # the README's test command
    assert len([c for c in COMMANDS if c not in NOT_RUN_HERE]) >= 20


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> str:
    """A copy of the repository's data, recipes and finetune.py: the README's `output/...` lands here."""
    work = str(tmp_path_factory.mktemp("readme") / "repo")
    os.makedirs(work)
    for name in ("data", "recipes"):
        shutil.copytree(os.path.join(ROOT, name), os.path.join(work, name))
    shutil.copy(os.path.join(ROOT, "finetune.py"), work)
    return work


# In the README's order, on one pytest-xdist worker: later commands use what earlier ones wrote (output/demo, output/rm).
@pytest.mark.xdist_group("readme")
@pytest.mark.parametrize("command", [c for c in COMMANDS if c not in NOT_RUN_HERE])
def test_readme_command_runs_as_written_and_does_what_it_says(command, work):
    if command.startswith("pip install -e . -c constraints.txt && "):  # the main job: installing is .ci/run's part
        command = command.split("&& ", 1)[1]
    env = fresh_env(MASTER_PORT=free_port())
    started = time.monotonic()
    proc = subprocess.run(command, shell=True, executable="/bin/sh", cwd=work, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if not command.startswith("torchrun"):  # a LoRA run, rm, dpo, chat, merge, eval, ... print no library noise
        assert not library_noise(proc.stdout + proc.stderr), library_noise(proc.stdout + proc.stderr)
    check(command, proc, work)
    print(f"{time.monotonic() - started:5.0f} s  {command}")  # shown with -s: what each README command costs
