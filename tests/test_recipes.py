"""The first hour: the SFT recipes run as the README shows them on data/ with the embedded model. Learning, shown by a
reload in a fresh process that answers as trained, once per recipe family and method: the README's main job (full)
and single-GPU LoRA recipe in tests/test_readme.py, full / LoRA / Q-LoRA in tests/test_sft.py. The Q-LoRA recipes are
launched here; the other DeepSpeed recipes in tests/test_distributed.py (full ZeRO-3: partitioned, equal to one
process, resumed; LoRA ZeRO-2)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from helpers import ROOT, free_port, fresh_env, generate_in_fresh_process

pytestmark = pytest.mark.slow


def run(command: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=fresh_env(MASTER_PORT=free_port()))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("recipe, launcher", [("finetune_qlora_single_gpu.sh", "+ python"), ("finetune_qlora_ds.sh", "+ torchrun --nproc_per_node 2")])
def test_qlora_recipe_trains_a_4bit_base_and_the_adapter_reloads(recipe, launcher, tmp_path):
    """The Q-LoRA recipes, alone and under ZeRO-2 on 2 CPU ranks (the other DeepSpeed recipes are run in
    test_distributed): the recipe's YAML applies, every adapter matrix trains, and the adapter reloads. Q-LoRA's
    learning is shown by test_sft's Q-LoRA run; the single-GPU recipes' by the README's LoRA recipe."""
    from safetensors.torch import load_file

    out = str(tmp_path / "out")
    proc = run(["sh", os.path.join("recipes", recipe), "-d", "data/sft_example.json", "-o", out, "--max_steps", "3",
                "--per_device_train_batch_size", "2"])
    assert launcher in proc.stderr and "recipes/finetune_qlora.yaml" in proc.stderr
    saved = json.load(open(os.path.join(out, "training_args.json")))
    assert saved["num_train_epochs"] == 40  # the YAML's embedded_model section applied (no -m)
    assert json.load(open(os.path.join(out, "adapter_config.json")))["r"] == 64  # the YAML's rank
    lora_b = [t for name, t in load_file(os.path.join(out, "adapter_model.safetensors")).items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: trained (on every rank) and saved
    generate_in_fresh_process(out, [[{"role": "user", "content": "Hi"}]], adapter=True)


def test_rl_recipes_take_the_flags_print_their_command_and_name_what_they_need():
    """train_ppo.sh / train_grpo.sh take -m/-d/-o like every recipe (ppo also -r REWARD_MODEL), pass the rest on and
    print what they run; the old positional form, and a flag a recipe does not read, get its usage line, not a run."""
    def sh(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=fresh_env())

    proc = sh("recipes/train_ppo.sh", "-m", "SFT", "-r", "RM", "-d", "PROMPTS", "-o", "OUT", "--help")
    assert proc.returncode == 0 and "usage: qwen-tune ppo" in proc.stdout, proc.stderr
    assert (f"+ python -m qwen_tune ppo --config {ROOT}/recipes/train_ppo.yaml --policy SFT --reward_model RM "
            "--prompts PROMPTS --output_dir OUT --help") in proc.stderr
    for args, said in [(["recipes/train_ppo.sh", "SFT", "RM", "PROMPTS"], "usage: sh recipes/train_ppo.sh -m SFT_OUT -r RM_OUT -d PROMPTS"),
                       (["recipes/train_grpo.sh", "-d", "PROMPTS"], "usage: sh recipes/train_grpo.sh -m SFT_OUT -d PROMPTS"),
                       (["recipes/train_dpo.sh", "-r", "RM", "-d", "PAIRS"], "recipes/train_dpo.sh takes no -r"),
                       (["recipes/train_orpo.sh", "-f", "DATA", "-d", "PAIRS"], "recipes/train_orpo.sh takes no -f"),
                       (["recipes/train_simpo.sh", "-r", "RM", "-d", "PAIRS"], "recipes/train_simpo.sh takes no -r")]:
        proc = sh(*args)
        assert proc.returncode == 2 and said in proc.stderr and "+ " not in proc.stderr, (args, proc.stderr)
