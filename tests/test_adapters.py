"""LoRA and Q-LoRA with the default options on every Qwen model type: the adapter trains and reloads on its base.

Tiny random checkpoints of each type are saved from config (no download) and loaded the way `qwen-tune sft` loads
them (load_model, add_lora with LoraOptions' defaults); one packed step; the adapter saved with save_pretrained
reloads on the original base (loading.load_trained: a composite checkpoint's adapter on its own class) and gives
the logits it had in training.
"""

from __future__ import annotations

import pytest
import torch

from test_hybrid_packing import ATTENTION_ONLY, COMPOSITE, HYBRID, save_tiny_checkpoint
from qwen_tune.options import LoraOptions
from qwen_tune.data.collate import PackedCollator
from qwen_tune.models.trained import load_trained
from qwen_tune.models.lora import add_lora
from qwen_tune.models.model import load_model
from qwen_tune.train.loss import causal_lm_loss_sum

EVERY_TYPE = ATTENTION_ONLY + HYBRID + COMPOSITE


def one_step(model, conversations) -> None:
    """Mean token loss, backward, SGD at 1.0 on what trains: lora_B starts at zero, so only a step moves the output."""
    loss_sum, n = causal_lm_loss_sum(model.train(), PackedCollator()(conversations))
    (loss_sum / n).backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert [name for name, p in trainable.items() if "lora_B" in name and not (p.grad is not None and p.grad.any())] == []
    torch.optim.SGD(trainable.values(), lr=1.0).step()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.support("LoRA", EVERY_TYPE)
@pytest.mark.parametrize("model_type", EVERY_TYPE)
def test_lora_with_the_defaults_trains_and_reloads_on_its_base(model_type, tmp_path, tokenizer, conversations):
    base = save_tiny_checkpoint(model_type, tmp_path / "base", tokenizer)
    model = add_lora(load_model(base), **LoraOptions(use_lora=True).adapter_options())
    one_step(model, conversations)
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([conversations[0]["input_ids"][:40]])
    trained = logits(model, ids)
    reloaded = load_trained(str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(reloaded, ids), trained, rtol=1e-5, atol=1e-5)
    with reloaded.disable_adapter():
        assert (trained - logits(reloaded, ids)).abs().max() > 1e-4  # the adapter is on, not left out


@pytest.mark.support("Q-LoRA", EVERY_TYPE)
@pytest.mark.parametrize("model_type", EVERY_TYPE)
def test_qlora_with_the_defaults_trains_an_adapter_on_a_4bit_base(model_type, tmp_path, tokenizer, conversations):
    base = save_tiny_checkpoint(model_type, tmp_path / "base", tokenizer)
    model = add_lora(load_model(base, q_lora=True), q_lora=True, **LoraOptions(use_lora=True, q_lora=True).adapter_options())
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    one_step(model, conversations)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
