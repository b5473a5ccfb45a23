"""The first hour: the SFT recipes run as the README shows them on data/ with the embedded model. Learning, shown by a
reload in a fresh process that answers as trained, once per method: full (the README's main job) and LoRA (the
single-GPU LoRA recipe) in tests/test_readme.py, Q-LoRA here. The DeepSpeed recipes are launched on 2 CPU ranks here
(Q-LoRA) and in tests/test_distributed.py (full ZeRO-3: partitioned, equal to one process, resumed; LoRA ZeRO-2)."""

from __future__ import annotations

import json
import os
import random
import subprocess

import pytest

from helpers import ROOT, assert_answers_as_trained, fresh_env, generate_in_fresh_process

pytestmark = pytest.mark.slow


def run(command: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=fresh_env(MASTER_PORT=str(random.randint(20000, 40000))))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_qlora_recipe_on_the_embedded_model_answers_as_trained_after_a_reload(tmp_path):
    """The single-GPU Q-LoRA recipe with its YAML's embedded_model section (100 epochs at 5e-3) learns the data."""
    out = str(tmp_path / "out")
    run(["sh", os.path.join("recipes", "finetune_qlora_single_gpu.sh"), "-d", "data/sft_example.json", "-o", out])
    saved = json.load(open(os.path.join(out, "training_args.json")))
    assert saved["num_train_epochs"] == 100  # the YAML's embedded_model section applied (no -m)
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))
    assert_answers_as_trained(out, adapter=True)


def test_qlora_deepspeed_recipe_trains_a_4bit_base_on_two_ranks_and_the_adapter_reloads(tmp_path):
    """Q-LoRA under ZeRO-2 on 2 CPU ranks (the other DeepSpeed recipes are run in test_distributed): the recipe's
    YAML applies, every adapter matrix trains and the adapter reloads."""
    from safetensors.torch import load_file

    out = str(tmp_path / "out")
    proc = run(["sh", os.path.join("recipes", "finetune_qlora_ds.sh"), "-d", "data/sft_example.json", "-o", out,
                "--max_steps", "3", "--per_device_train_batch_size", "2"])
    assert "+ torchrun --nproc_per_node 2" in proc.stderr and "recipes/finetune_qlora.yaml" in proc.stderr
    assert json.load(open(os.path.join(out, "adapter_config.json")))["r"] == 64  # the YAML's rank
    lora_b = [t for name, t in load_file(os.path.join(out, "adapter_model.safetensors")).items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: trained and saved from both ranks
    generate_in_fresh_process(out, [[{"role": "user", "content": "Hi"}]], adapter=True)
