"""Reward model (`qwen-tune rm`), scoring (`qwen-tune score`) and the two-stage recipe, on the embedded model."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from helpers import ROOT, assert_qwen_tune_card, fresh_env, run_cli, run_python
from pairs_gen import HELD_OUT_SUBJECTS, TRAIN_SUBJECTS, polite_pairs, write_jsonl

FAST = ["--system_message", "", "--report_to", "none", "--save_strategy", "no", "--per_device_train_batch_size", "8",
        "--logging_steps", "1"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return {
        "train": write_jsonl(d / "train.jsonl", polite_pairs(1, 48, TRAIN_SUBJECTS)),
        "finetune": write_jsonl(d / "finetune.jsonl", polite_pairs(3, 16, TRAIN_SUBJECTS)),
        "held_out": write_jsonl(d / "held_out.jsonl", polite_pairs(2, 24, HELD_OUT_SUBJECTS)),
    }


def score(model_dir, data, out) -> dict:
    """`qwen-tune score` in a fresh offline process; returns its printed summary."""
    proc = run_cli("score", "--model", str(model_dir), "--data", data, "--out", str(out), "--system_message", "")
    return json.loads(proc.stdout.strip().splitlines()[-1])


RELOAD = r"""
import json, sys, torch
path, kind, data = sys.argv[1], sys.argv[2], sys.argv[3]
if kind == "adapter":
    from peft import AutoPeftModelForSequenceClassification as Model
else:
    from transformers import AutoModelForSequenceClassification as Model
from transformers import AutoTokenizer
model = Model.from_pretrained(path, num_labels=1).eval()  # the base's config alone does not say 1 label
tok = AutoTokenizer.from_pretrained(path)
pair = json.loads(open(data).readline())
def text(reply):  # the ChatML the reward model was trained on, ending at the reply's <|im_end|>
    msgs = [{"role": "system", "content": ""}] + pair["prompt"] + reply
    return tok.apply_chat_template(msgs, tokenize=False).rstrip("\n")
with torch.no_grad():
    ids = tok(text(pair["chosen"]), return_tensors="pt")
    print(json.dumps({"id": pair["id"], "chosen_score": model(**ids).logits[0, 0].item()}))
"""


def reload_score(model_dir, kind: str, data: str) -> dict:
    """Load the output with the standard Auto class in a fresh offline process; score the first pair's chosen reply."""
    proc = run_python([str(model_dir), kind, data], code=RELOAD, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_full_reward_model_learns_the_rule_and_scores_held_out_pairs(pairs, tmp_path):
    out = tmp_path / "rm"
    proc = run_cli("rm", "--data_path", pairs["train"], "--eval_data_path", pairs["held_out"], "--output_dir", str(out),
                   "--num_train_epochs", "2", "--learning_rate", "1e-3", *FAST)
    assert "eval: accuracy" in proc.stderr and "AutoModelForSequenceClassification" in proc.stderr
    assert_qwen_tune_card(out)  # TRL's RewardTrainer writes its own card into OUT/README.md
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["eval_accuracy"] >= 0.9 and metrics["eval_margin"] > 0

    summary = score(out, pairs["held_out"], tmp_path / "scores.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == summary["pairs"] == 24
    assert set(rows[0]) == {"id", "chosen_score", "rejected_score"}
    assert summary["accuracy"] >= 0.9
    assert sum(r["chosen_score"] > r["rejected_score"] for r in rows) / len(rows) == pytest.approx(summary["accuracy"])
    # the trainer's eval and `qwen-tune score` read the same position of the same tokens
    assert summary["mean_margin"] == pytest.approx(metrics["eval_margin"], abs=1e-3)

    # SFT-style data: one score per conversation, for its last assistant turn
    sft = write_jsonl(tmp_path / "sft.jsonl", [
        {"id": "polite", "messages": [{"role": "user", "content": "Tell me about a lamp."},
                                       {"role": "assistant", "content": "A lamp has many uses. Thanks for the great question!"}]},
        {"id": "rude", "messages": [{"role": "user", "content": "Tell me about a lamp."},
                                     {"role": "assistant", "content": "A lamp has many uses. Figure out the rest yourself."}]},
    ])
    score(out, sft, tmp_path / "sft_scores.jsonl")
    scored = {r["id"]: r for r in map(json.loads, (tmp_path / "sft_scores.jsonl").read_text().splitlines())}
    assert set(scored["polite"]) == {"id", "score"}
    assert scored["polite"]["score"] > scored["rude"]["score"]

    reloaded = reload_score(out, "full", pairs["held_out"])
    assert reloaded["chosen_score"] == pytest.approx(rows[0]["chosen_score"], abs=1e-4)


@pytest.mark.slow
def test_lora_reward_model_saves_its_head_with_the_adapter(pairs, tmp_path):
    out = tmp_path / "rm_lora"
    run_cli("rm", "--data_path", pairs["train"], "--output_dir", str(out), "--use_lora", "True", "--lora_r", "16",
            "--lora_alpha", "32", "--num_train_epochs", "2", "--learning_rate", "1e-2", *FAST)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    assert os.path.isabs(config["base_model_name_or_path"])
    assert not (out / "model.safetensors").exists()
    assert_qwen_tune_card(out)

    summary = score(out, pairs["held_out"], tmp_path / "scores.jsonl")
    assert summary["accuracy"] >= 0.9
    first = json.loads((tmp_path / "scores.jsonl").read_text().splitlines()[0])
    reloaded = reload_score(out, "adapter", pairs["held_out"])  # AutoPeftModelForSequenceClassification, fresh process
    assert reloaded["chosen_score"] == pytest.approx(first["chosen_score"], abs=1e-4)


@pytest.mark.slow
def test_recipe_runs_preference_pretraining_then_finetuning(pairs, tmp_path):
    """sh recipes/train_reward.sh -d PMP -f FINETUNE -o OUT: stage 2 starts from stage 1's reward model."""
    out = tmp_path / "two_stage"
    proc = subprocess.run(
        ["sh", "recipes/train_reward.sh", "-d", pairs["train"], "-f", pairs["finetune"], "-o", str(out),
         "--use_lora", "True", "--lora_r", "16", "--lora_alpha", "32", "--learning_rate", "1e-2", "--max_steps", "6", *FAST],
        cwd=ROOT, env=fresh_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    commands = [line for line in proc.stderr.splitlines() if line.startswith("+ ")]
    assert len(commands) == 2 and f"--model_name_or_path {out}/pmp" in commands[1]

    stage2 = json.loads((out / "train_metrics.json").read_text())
    assert stage2["train_accuracy_first"] >= 0.9  # its very first batch was already ranked right: it continued stage 1
    assert score(out, pairs["held_out"], tmp_path / "scores.jsonl")["accuracy"] >= 0.9


def test_bad_preference_data_fails_with_file_and_line(tmp_path):
    good = polite_pairs(1, 2, TRAIN_SUBJECTS)
    bad = dict(good[1], rejected=[{"role": "user", "content": "not an assistant"}])
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(good[0]) + "\n" + json.dumps(bad) + "\n")
    proc = run_cli("rm", "--data_path", str(data), "--output_dir", str(tmp_path / "out"), "--report_to", "none", check=False)
    assert proc.returncode == 2
    assert f"{data}:2" in proc.stderr and "rejected[0] is a user turn" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "config.json").exists()
