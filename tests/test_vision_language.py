"""Composite (vision-language) checkpoints trained on text keep everything they had.

Every Qwen3.5+ checkpoint, and the Qwen3-VL / Qwen2.5-VL line, is a language model with a vision tower beside it.
AutoModelForCausalLM would load the language model alone (or refuse the checkpoint), and the saved result would have
lost its vision tower. load_model loads them as their own class with the vision tower frozen; the output has every
tensor name and shape of the input, the vision tensors unchanged, and reloads as its own class (a LoRA adapter on
the original base). Tiny random checkpoints of each type are built from config; no download.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from helpers import DATA, run_cli, run_python
from test_hybrid_packing import COMPOSITE, NOT_PACKED, save_tiny_checkpoint
from qwen_tune.data.collate import PackedCollator
from qwen_tune.models.model import load_model, packing_is_exact
from qwen_tune.train.loss import causal_lm_loss_sum



def saved_tensors(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def is_vision(name: str) -> bool:
    return "visual" in name.split(".")


def is_indexer(name: str) -> bool:
    """Qwen4-Exp's attention indexer: frozen by load_model (no gradient reaches it)."""
    return "indexer" in name.split(".")


@pytest.mark.support("full", COMPOSITE)
@pytest.mark.parametrize("model_type", COMPOSITE)
def test_text_training_keeps_every_tensor_of_a_composite_checkpoint(model_type, tmp_path, tokenizer, conversations):
    """load_model -> own class, vision tower frozen; one step, with a gradient on every language-model tensor and none
    on the vision tower; the saved output has the input's tensor names and shapes,
    the vision tensors bit-equal, the language model's changed."""
    base = save_tiny_checkpoint(model_type, tmp_path / "base", tokenizer)
    lines = []
    model = load_model(base, dtype=torch.float64, experts_implementation="eager", log=lines.append)
    assert type(model).__name__.endswith("ForConditionalGeneration")
    assert lines and f"model: {model_type} is vision-language; loaded as {type(model).__name__}" in lines[0]
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen and frozen == {name for name, _ in model.named_parameters() if is_vision(name) or is_indexer(name)}
    assert any(line.startswith("model: the attention indexers of qwen4_exp (") for line in lines) == (model_type == "qwen4_exp")

    assert packing_is_exact(model) == (model_type not in NOT_PACKED)  # (packed == one by one: test_hybrid_packing.py)
    loss_sum, n = causal_lm_loss_sum(model.train(), PackedCollator()(conversations))
    (loss_sum / n).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and bool(p.grad.any())) == (name not in frozen), name
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    model.to(torch.float32).save_pretrained(tmp_path / "out")

    before, after = saved_tensors(base), saved_tensors(tmp_path / "out")
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    assert any(is_vision(k) for k in before)
    for name in before:  # (a gradient of 1e-8 on a scalar of 2.7 does not show in float32: frozen ones only are compared)
        assert torch.equal(before[name], after[name]) or not (is_vision(name) or is_indexer(name)), name
    trained = [n for n in before if not (is_vision(n) or is_indexer(n))]
    assert sum(not torch.equal(before[name], after[name]) for name in trained) >= len(trained) - 2


RELOAD = """
import sys, torch
from transformers import AutoModelForImageTextToText
from qwen_tune.tools.chat import load_for_inference
full = AutoModelForImageTextToText.from_pretrained(sys.argv[1])
base = AutoModelForImageTextToText.from_pretrained(sys.argv[2])
adapter, _ = load_for_inference(sys.argv[3])
ids = torch.tensor([[151644, 872, 198, 14990, 151645, 198, 151644, 77091, 198]])
print(type(full).__name__, type(adapter.get_base_model()).__name__)
print(full.generate(ids, max_new_tokens=3, do_sample=False).shape[1] - ids.shape[1])
with torch.no_grad():
    print(float((adapter(input_ids=ids).logits - base(input_ids=ids).logits).abs().max()))
"""


@pytest.mark.slow
@pytest.mark.support("LoRA", ["qwen3_5"])
def test_sft_cli_on_a_qwen3_5_checkpoint_saves_and_reloads_it_whole(tmp_path, tokenizer):
    """A user's runs on a Qwen3.5 checkpoint: full and LoRA sft with the defaults (packed); the full output has every tensor
    of the input and reloads as Qwen3_5ForConditionalGeneration in a fresh process and generates; the adapter holds
    no vision tensor, reloads on the original base as its own class, and moves the logits; each has our card."""
    base = save_tiny_checkpoint("qwen3_5", tmp_path / "base", tokenizer)
    common = ["--model_name_or_path", base, "--data_path", f"{DATA}/sft_example.json", "--max_steps", "2",
              "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no"]
    full, lora = tmp_path / "full", tmp_path / "lora"
    proc = run_cli("sft", *common, "--output_dir", str(full))
    assert "model: qwen3_5 is vision-language; loaded as Qwen3_5ForConditionalGeneration" in proc.stderr
    assert "packing: off" not in proc.stderr  # packed, the linear-attention layers split per sample
    assert "AutoModelForImageTextToText.from_pretrained" in proc.stderr
    assert json.loads((full / "config.json").read_text())["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    before, after = saved_tensors(base), saved_tensors(full)
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}

    proc = run_cli("sft", *common, "--output_dir", str(lora), "--use_lora", "True", "--learning_rate", "1e-2")
    assert "PeftModel.from_pretrained(base" in proc.stderr
    adapter = saved_tensors(lora)
    assert adapter and not any(is_vision(k) for k in adapter)
    for out in (full, lora):
        assert "tags: [qwen-tune, sft" in (out / "README.md").read_text() and not (out / "MODEL_CARD.md").exists()

    proc = run_python([str(full), base, str(lora)], code=RELOAD)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert lines[0] == "Qwen3_5ForConditionalGeneration Qwen3_5ForConditionalGeneration"
    assert int(lines[1]) == 3
    assert float(lines[2]) > 1e-3  # the adapter is applied, not silently left out


def test_a_method_transformers_has_no_class_for_says_so_in_one_line(tmp_path, tokenizer):
    """rm on Qwen3.5-MoE (transformers has no sequence-classification class for it): a UserError, not a traceback."""
    from transformers import AutoModelForSequenceClassification

    from qwen_tune.errors import UserError

    base = save_tiny_checkpoint("qwen3_5_moe", tmp_path / "base", tokenizer)
    with pytest.raises(UserError, match=r"has no SequenceClassification model for qwen3_5_moe, so this method cannot train it"):
        load_model(base, model_class=AutoModelForSequenceClassification, num_labels=1)
