"""The first hour: every SFT recipe, run as the README shows on data/ with the embedded model, learns the example
conversations: reloaded in a fresh process, it answers as trained. (The README's main job and the single-GPU LoRA
recipe are run by tests/test_readme.py, as the README's commands.)"""

from __future__ import annotations

import json
import os
import random
import subprocess

import pytest

from helpers import ROOT, assert_answers_as_trained, fresh_env

pytestmark = pytest.mark.slow


def run(command: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=fresh_env(MASTER_PORT=str(random.randint(20000, 40000))))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("recipe, adapter", [
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
