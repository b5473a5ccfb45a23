"""DPO (`qwen-tune dpo`) on the embedded model: it must raise log p(chosen) - log p(rejected) on unseen pairs."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import run_cli
from pairs_gen import HELD_OUT_SUBJECTS, TRAIN_SUBJECTS, polite_pairs, write_jsonl


def logprob_margins(model, tokenizer, data: str) -> torch.Tensor:
    """Per pair: sum log p(chosen reply | prompt) - sum log p(rejected reply | prompt), on the tokens dpo trains on."""
    import copy

    from qwen_tune.data.chat_format import resolve_format
    from qwen_tune.data.pairs import encode_pairs

    pairs, _ = encode_pairs(data, resolve_format(copy.copy(tokenizer), system_message=""), 512, split_prompt=True)

    def logp(prompt, reply):
        ids = torch.tensor([prompt + reply])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
        return logits.log_softmax(-1).gather(1, ids[0, len(prompt):, None]).sum().item()

    return torch.tensor([logp(p["prompt_ids"], p["chosen_ids"]) - logp(p["prompt_ids"], p["rejected_ids"]) for p in pairs])


@pytest.mark.slow
def test_dpo_raises_the_chosen_over_rejected_margin_on_held_out_pairs(tmp_path, tokenizer, base_model_path):
    from transformers import AutoModelForCausalLM

    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(1, 24, TRAIN_SUBJECTS))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", polite_pairs(2, 12, HELD_OUT_SUBJECTS))
    before = logprob_margins(AutoModelForCausalLM.from_pretrained(base_model_path).eval(), tokenizer, held_out)

    out = tmp_path / "dpo"
    proc = run_cli("dpo", "--data_path", train, "--output_dir", str(out), "--system_message", "", "--max_steps", "6",
                   "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--beta", "0.1",
                   "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1")
    assert "AutoModelForCausalLM" in proc.stderr
    assert json.loads((out / "train_metrics.json").read_text())["data"]["train"]["kept"] == 24

    after = logprob_margins(AutoModelForCausalLM.from_pretrained(str(out)).eval(), tokenizer, held_out)
    print(f"held-out log-prob margin: {before.mean():.2f} before DPO, {after.mean():.2f} after")
    assert after.mean() > before.mean() + 3.0, (before.mean(), after.mean())
    assert (after > before).float().mean() >= 0.9


def test_dpo_rejects_sft_data_with_file_and_line(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    proc = run_cli("dpo", "--data_path", data, "--output_dir", str(tmp_path / "out"), "--report_to", "none", check=False)
    assert proc.returncode == 2 and f"{data}:1" in proc.stderr and "looks like SFT data" in proc.stderr
