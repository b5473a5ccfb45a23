"""Every Qwen text type is trained on batches whose samples cannot see each other: packed where that is exact, padded
on hybrid models (Qwen3-Next, Qwen3.5+: Gated DeltaNet linear attention before every fourth full-attention layer).

Packing restarts `position_ids`, which keeps samples apart in attention layers only: the linear-attention layers'
convolution window and recurrent state run across the row. So on these models sft and dpo pad instead (one line
says so), and what they compute equals each sample alone. Tiny random checkpoints of each type are built from
config (no download), with the embedded model's tokenizer, in float64 so that equality tests the layout, not
summation order.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from helpers import DATA, run_cli
from qwen_tune.data.chat_format import IGNORE, resolve_format
from qwen_tune.data.collate import PackedCollator, PackedPairCollator, PaddedPairCollator
from qwen_tune.data.dataset import load_sft_dataset
from qwen_tune.data.pairs import encode_pairs
from qwen_tune.model import packing_for, packing_is_exact
from qwen_tune.train.loss import causal_lm_loss_sum, sequence_logprobs

ATTENTION_ONLY = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe")
HYBRID = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
             moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
             vocab_size=151936, tie_word_embeddings=True)


def tiny_model(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **SMALL)
    # the experts' grouped GEMM has no float64 kernel: the per-expert loop computes the same
    return AutoModelForCausalLM.from_config(config, dtype=torch.float64, experts_implementation="eager").eval()


@pytest.fixture(scope="module")
def conversations(tokenizer):
    samples, _ = load_sft_dataset(f"{DATA}/sft_example.json", resolve_format(copy.copy(tokenizer)), 512)
    return [{"input_ids": s.input_ids, "labels": s.labels, "id": s.id} for s in samples[:3]]


def one_by_one_loss(model, features):
    return sum(causal_lm_loss_sum(model, PackedCollator()([f]))[0] for f in features)


@pytest.mark.parametrize("model_type", ATTENTION_ONLY + HYBRID)
def test_sft_batches_equal_each_sample_alone_on_every_qwen_text_type(model_type, conversations):
    """The batch sft builds (packed where exact, padded on hybrids, with one line saying so) gives the loss of each
    sample alone, in float64: sums of a few hundred token losses agree to ~1e-12, a sample seeing another one moves
    the loss by far more."""
    from qwen_tune.args import parse
    from qwen_tune.sft import ARGUMENTS, collator_for

    model = tiny_model(model_type)
    lines = []
    data_args, args = (parse(ARGUMENTS, ["--data_path", f"{DATA}/sft_example.json", "--output_dir", "/nonexistent"]))[1::2]
    collator = collator_for(data_args, args, 0, packing_for(model.config, data_args.packing, lines.append))
    assert isinstance(collator, PackedCollator) == (model_type in ATTENTION_ONLY) == packing_is_exact(model.config)
    if model_type in HYBRID:
        assert lines == [f"packing: off: {model.config.model_type} has linear_attention layers, which would carry one "
                         "sample into the next in a packed row; batches are padded instead"]
    with torch.no_grad():
        batched = causal_lm_loss_sum(model, collator(conversations))[0]
        alone = one_by_one_loss(model, conversations)
        packed = causal_lm_loss_sum(model, PackedCollator()(conversations))[0]
    torch.testing.assert_close(batched, alone, rtol=1e-10, atol=1e-9)
    if model_type in HYBRID:
        assert abs(packed - alone) > 1e-4  # what packing would have done: the check above can fail


def alone_logprob(model, prompt: list[int], reply: list[int]) -> torch.Tensor:
    """log p(reply | prompt) with the sequence alone in its batch."""
    batch = {"input_ids": torch.tensor([prompt + reply]), "labels": torch.tensor([[IGNORE] * len(prompt) + reply]),
             "sequence": torch.zeros(1, len(prompt) + len(reply), dtype=torch.long)}
    return sequence_logprobs(model, batch, 1)[0]


@pytest.mark.parametrize("model_type", ATTENTION_ONLY + HYBRID)
def test_dpo_pairs_equal_each_sequence_alone_on_every_qwen_text_type(model_type, tokenizer):
    """dpo's batch of pairs (packed where exact, else PaddedPairCollator): each sequence's log-probability equals the
    sequence alone (float64, as above)."""
    model = tiny_model(model_type)
    pairs, _ = encode_pairs(f"{DATA}/preference_example.jsonl", resolve_format(copy.copy(tokenizer)), 512, split_prompt=True)
    features = [pairs[i] for i in range(3)]
    collator = PackedPairCollator() if packing_for(model.config, True, print) else PaddedPairCollator(0)  # as dpo.run
    with torch.no_grad():
        batched = sequence_logprobs(model, collator(features), 6)
        packed = sequence_logprobs(model, PackedPairCollator()(features), 6)
        alone = torch.stack([alone_logprob(model, f["prompt_ids"], f[side]) for side in ("chosen_ids", "rejected_ids") for f in features])
    torch.testing.assert_close(batched, alone, rtol=1e-10, atol=1e-9)
    if model_type in HYBRID:
        assert (packed - alone).abs().max() > 1e-4


@pytest.mark.slow
def test_sft_cli_on_a_hybrid_checkpoint_says_it_pads_and_trains(tmp_path, tokenizer):
    """A user's run: a qwen3_next checkpoint, the defaults (packing asked for), two steps, a saved model."""
    checkpoint = str(tmp_path / "qwen3_next")
    model = tiny_model("qwen3_next").float()
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    out = tmp_path / "out"
    proc = run_cli("sft", "--model_name_or_path", checkpoint, "--data_path", f"{DATA}/sft_example.json", "--output_dir", str(out),
                   "--max_steps", "2", "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no")
    assert "packing: off: qwen3_next has linear_attention layers" in proc.stderr
    assert (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3_next"
    assert os.path.exists(out / "train_metrics.json")
