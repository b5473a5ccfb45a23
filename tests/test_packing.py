"""Packing and padding change the layout of a batch, never what is learned.

A packed row (position_ids restarting at each sample, no attention mask) must give the same loss
and gradients as running its samples one by one: attention may never cross a sample boundary.
Also: dynamic padding, length-grouped sampling when packing is off, gradient checkpointing with
LoRA, and the flash-attention message.
"""

import importlib.util
import json
import tempfile

import pytest
import torch
from helpers import DATA, run_cli

from qwen_tune.options import load
from qwen_tune.options.prepare import trainer_arguments
from qwen_tune.data.collate import PackedCollator, PaddedCollator
from in_memory_sft import SFTDataset, load_sft_dataset
from qwen_tune.errors import UserError
from qwen_tune.models.lora import add_lora
from qwen_tune.models.model import load_model
from qwen_tune.methods.sft import METHOD, SFTLossTrainer, collator_for
from qwen_tune.train.loss import causal_lm_loss_sum


@pytest.fixture(scope="module")
def samples(chatml):
    encoded, _ = load_sft_dataset(f"{DATA}/sft_example.json", chatml, 512)
    return [{"input_ids": s.input_ids, "labels": s.labels, "id": s.id} for s in encoded]


@pytest.fixture(scope="module")
def model(base_model_path):
    m = load_model(base_model_path)
    m.config.use_cache = False  # as sft.py: transformers honours packed position_ids only without the cache
    return m


def loss_and_grads(model, batch):
    model.zero_grad()
    loss, n = causal_lm_loss_sum(model, batch)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), n, grads


def one_by_one(model, features):
    """Reference: each sample alone (batch of one, no padding), loss sums and gradients added up."""
    total, count, grads = 0.0, 0, {}
    for f in features:
        loss, n, g = loss_and_grads(model, PaddedCollator(pad_token_id=0)([f]))
        total, count = total + loss, count + n
        grads = {k: grads.get(k, 0) + v for k, v in g.items()}
    return total, count, grads


def assert_same(got, want, tol=1e-5):
    loss, n, grads = got
    ref_loss, ref_n, ref_grads = want
    assert n == ref_n > 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        diff, scale = (g - ref_grads[name]).norm().item(), ref_grads[name].norm().item()
        assert diff <= tol * scale + 1e-12, f"{name}: relative gradient error {diff / max(scale, 1e-30):.2e}"


def test_packed_batch_equals_samples_one_by_one(model, samples):
    features = samples[:4]
    packed = PackedCollator()(features)
    assert packed["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in features))
    assert "attention_mask" not in packed
    assert_same(loss_and_grads(model, packed), one_by_one(model, features))


def test_packing_without_restarting_positions_would_differ(model, samples):
    """The check above can fail: one causal row over the same tokens (attention crossing samples)
    gives another loss, so equality really comes from the restarting position_ids."""
    packed = PackedCollator()(samples[:4])
    crossed = {k: v for k, v in packed.items() if k != "position_ids"}
    with pytest.raises(AssertionError):
        assert_same(loss_and_grads(model, crossed), one_by_one(model, samples[:4]))


def test_dynamic_and_max_padding_equal_samples_one_by_one(model, samples):
    features = samples[4:7]  # lengths 99, 104, 47: real padding in the batch
    dynamic = PaddedCollator(pad_token_id=151643)(features)
    assert dynamic["input_ids"].shape == (3, max(len(f["input_ids"]) for f in features))
    ref = one_by_one(model, features)
    assert_same(loss_and_grads(model, dynamic), ref)
    to_max = PaddedCollator(pad_token_id=151643, pad_to=160)(features)
    assert to_max["input_ids"].shape == (3, 160)
    assert_same(loss_and_grads(model, to_max), ref)


def test_pad_id_equal_to_im_end_keeps_end_of_turn_labels(samples):
    """Labels come from ChatML, never from pad ids: padding with <|im_end|> masks nothing real."""
    im_end = 151645
    batch = PaddedCollator(pad_token_id=im_end)(samples[:3])
    for row, f in enumerate(samples[:3]):
        assert batch["labels"][row, : len(f["labels"])].tolist() == f["labels"]
        assert im_end in f["labels"]


def parsed(*argv):
    """The resolved config, and the Trainer's arguments built from it."""
    out = tempfile.mkdtemp(prefix="qwen-tune-options-")
    config = load(METHOD, ["--data_path", "x.json", "--output_dir", out, "--report_to", "none", *argv])
    return config, trainer_arguments(config, resume=None, own_ranks=False)


def test_packing_off_groups_by_length_unless_told_otherwise():
    assert parsed()[1].train_sampling_strategy == "random"  # packing: order does not cost padding
    assert parsed("--packing", "False", "--train_sampling_strategy", "random")[1].train_sampling_strategy == "random"
    assert parsed("--packing", "False")[1].train_sampling_strategy == "group_by_length"
    assert parsed("--packing", "False", "--train_sampling_strategy", "sequential")[1].train_sampling_strategy == "sequential"
    config, args = parsed("--pad_to_max_length", "True")  # the seed's layout, the seed's random order
    assert not config.layout.packing and args.train_sampling_strategy == "random"


def padding_fraction(trainer) -> float:
    pads = total = 0
    for batch in trainer.get_train_dataloader():
        total += batch["attention_mask"].numel()
        pads += int((batch["attention_mask"] == 0).sum())
    return pads / total


def test_length_grouped_batches_waste_less_padding(model, samples, tokenizer, tmp_path):
    """With packing off, batches are built from samples of similar length (transformers'
    LengthGroupedSampler, sorting within random mega-batches of 4 x 12 samples here): much less
    padding than random batches on a mixed-length data set. No model step is run."""
    spread = [dict(s, input_ids=s["input_ids"] * k, labels=s["labels"] * k, id=f"{s['id']}x{k}")
              for s in samples for k in range(1, 17)]  # 192 samples from 47 to 1856 tokens
    fractions = {}
    for extra in ([], ["--train_sampling_strategy", "random"]):
        config, args = parsed("--packing", "False", "--output_dir", str(tmp_path), "--per_device_train_batch_size", "4", *extra)
        collator = collator_for(config.layout, config.data.model_max_length, tokenizer.pad_token_id, packing=False)
        trainer = SFTLossTrainer(model=model, args=args, train_dataset=SFTDataset_of(spread), data_collator=collator,
                             processing_class=tokenizer)
        fractions[args.train_sampling_strategy] = padding_fraction(trainer)
    assert fractions["group_by_length"] < 0.5 * fractions["random"], fractions


class SFTDataset_of(SFTDataset):
    """SFTDataset over already-collatable dicts (the test builds long samples by repetition)."""

    def __getitem__(self, i):
        return self.samples[i]


def test_gradient_checkpointing_with_packing_and_lora_gives_same_loss_and_gradients(base_model_path, samples):
    torch.manual_seed(0)
    lora = add_lora(load_model(base_model_path), r=8, alpha=16, dropout=0.0, target_modules="all-linear")
    lora.config.use_cache = False
    lora.train()
    for name, p in lora.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would leave A without gradient to compare
            torch.nn.init.normal_(p, std=0.02)
    packed = PackedCollator()(samples[:3])
    plain = loss_and_grads(lora, packed)
    lora.enable_input_require_grads()  # as sft.py does before checkpointing a frozen-embedding model
    lora.gradient_checkpointing_enable()
    assert lora.base_model.model.model.gradient_checkpointing
    checkpointed = loss_and_grads(lora, packed)
    assert plain[2] and all("lora_" in k for k in plain[2])  # only the adapter trains
    assert_same(checkpointed, plain)


@pytest.mark.slow
def test_sft_cli_gradient_checkpointing_lora_same_losses(tmp_path):
    """End to end: `--gradient_checkpointing True` with packing and LoRA trains, and logs the same losses."""
    losses = {}
    for gc in ("False", "True"):
        out = tmp_path / f"gc_{gc}"
        run_cli("sft", "--data_path", f"{DATA}/sft_example.json", "--output_dir", str(out), "--use_lora", "True",
                "--lora_r", "8", "--lora_dropout", "0", "--per_device_train_batch_size", "4", "--max_steps", "2",
                "--learning_rate", "1e-2", "--gradient_checkpointing", gc, "--report_to", "none", "--save_strategy", "no")
        metrics = json.loads((out / "train_metrics.json").read_text())
        losses[gc] = (metrics["train_loss"], metrics["train_loss_final"])  # mean over the 2 steps, last step
    assert losses["True"] == pytest.approx(losses["False"], rel=1e-3)  # Adam amplifies fp32 reordering


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_without_the_package_is_a_clear_user_error(base_model_path):
    with pytest.raises(UserError, match="flash_attention_2"):
        load_model(base_model_path, attn_implementation="flash_attention_2")
