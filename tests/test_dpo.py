"""DPO (`qwen-tune dpo`) on the embedded model: it must raise log p(chosen) - log p(rejected) on unseen pairs."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import DATA, assert_qwen_tune_card, logprob_margins, run_cli
from pairs_gen import HELD_OUT_SUBJECTS, TRAIN_SUBJECTS, polite_pairs, write_jsonl


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
    assert_qwen_tune_card(out)

    after = logprob_margins(AutoModelForCausalLM.from_pretrained(str(out)).eval(), tokenizer, held_out)
    print(f"held-out log-prob margin: {before.mean():.2f} before DPO, {after.mean():.2f} after")
    assert after.mean() > before.mean() + 3.0, (before.mean(), after.mean())
    assert (after > before).float().mean() >= 0.9


def test_packed_pair_logprobs_equal_one_by_one_forwards_with_gradients(tokenizer, base_model_path):
    """What the DPO loss sees: per-sequence sums over the reply tokens, all pairs packed in one row, equal the
    plain full-logits forward of each prompt+reply alone, and so do their gradients.

    In float64, so that the comparison tests packing, not a CPU's fp32 summation order: the packed and the plain
    paths add the same terms in other orders (chunks, one row vs many), which in fp32 moved an embedding gradient
    by 7e-4 on one CPU and 2e-5 on another. In fp64 (eps 1.1e-16) sums of a few thousand terms of magnitude <= 1e3
    differ by < 1e-9; a sample seeing another one changes values by orders of magnitude more (0.1 and up)."""
    import copy

    from transformers import AutoModelForCausalLM

    from qwen_tune.data.chat_format import resolve_format
    from qwen_tune.data.collate import PackedPairCollator
    from qwen_tune.data.pairs import encode_pairs
    from qwen_tune.train.loss import sequence_logprobs

    pairs, _ = encode_pairs(f"{DATA}/preference_example.jsonl", resolve_format(copy.copy(tokenizer)), 512, split_prompt=True)
    features = [pairs[i] for i in range(3)]
    model = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=torch.float64)
    packed = sequence_logprobs(model, PackedPairCollator()(features), 6, chunk_size=7)  # chunks cut through replies
    packed.sum().backward()
    grad_packed = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()

    def logp(prompt, reply):
        ids = torch.tensor([prompt + reply])
        logits = model(ids).logits[0, len(prompt) - 1 : -1]
        return logits.log_softmax(-1).gather(1, ids[0, len(prompt):, None]).sum()

    one_by_one = torch.stack([logp(f["prompt_ids"], f[side]) for side in ("chosen_ids", "rejected_ids") for f in features])
    one_by_one.sum().backward()
    assert packed.dtype == torch.float64
    torch.testing.assert_close(packed, one_by_one, atol=1e-9, rtol=1e-12)
    torch.testing.assert_close(grad_packed, model.model.embed_tokens.weight.grad, atol=1e-9, rtol=1e-9)


@pytest.mark.slow
def test_dpo_lora_learns_and_reports_held_out_preference_accuracy(tmp_path):
    """LoRA: the reference is the base with the adapter off; eval reports TRL's metric names; the adapter reloads."""
    from peft import AutoPeftModelForCausalLM

    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(1, 24, TRAIN_SUBJECTS))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", polite_pairs(2, 12, HELD_OUT_SUBJECTS))
    out = tmp_path / "dpo_lora"
    run_cli("dpo", "--data_path", train, "--eval_data_path", held_out, "--output_dir", str(out), "--system_message", "",
            "--use_lora", "True", "--max_steps", "8", "--per_device_train_batch_size", "4", "--learning_rate", "5e-3",
            "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1")
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["eval_rewards/accuracies"] >= 0.9 and metrics["eval_rewards/margins"] > 0, metrics
    assert AutoPeftModelForCausalLM.from_pretrained(str(out)).peft_config["default"].r == 64
    assert_qwen_tune_card(out)


def test_dpo_rejects_sft_data_with_file_and_line(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    proc = run_cli("dpo", "--data_path", data, "--output_dir", str(tmp_path / "out"), "--report_to", "none", check=False)
    assert proc.returncode == 2 and f"{data}:1" in proc.stderr and "looks like SFT data" in proc.stderr
