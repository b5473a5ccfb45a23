"""LoRA on Qwen's mixture-of-experts types (qwen2_moe, qwen3_moe, qwen3_next, qwen3_5_moe_text) with the options'
defaults: the routed experts (transformers 5 stores them as stacked 3-D parameters, which PEFT's all-linear misses)
are adapted through PEFT's `target_parameters`, train, save and reload in plain PEFT; the dropout PEFT refuses there is
0 unless the user asked otherwise, which is a one-line error; the routers stay frozen; the router's load-balancing
loss joins the training loss when the checkpoint's config asks for it; Q-LoRA says what bitsandbytes leaves in 16/32
bits. Tiny random checkpoints built from config (tests/test_hybrid_packing.py's SMALL), float32.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import DATA, assert_qwen_tune_card, run_cli
from test_hybrid_packing import SMALL
from qwen_tune.models.tokenizer import save_tokenizer
from qwen_tune.models.linear_attention import split_linear_attention

MOE = ("qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe_text")
SHARED_EXPERT = ("qwen2_moe", "qwen3_next", "qwen3_5_moe_text")
EXPERTS_LINE = "experts.gate_up_proj, experts.down_proj (routed experts, 4 per layer); router frozen"


def tiny(model_type: str, **config):
    """The same weights on every call (seed 0), so a fresh base can take a saved adapter; linear attention split per
    sample of a packed row, as load_model does."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **dict(SMALL, **config)), dtype=torch.float32)
    split_linear_attention(model)
    return model


def default_lora_options(*argv: str) -> dict:
    """`add_lora`'s options as `qwen-tune sft --use_lora True ARGV` resolves them (rank 4 for speed)."""
    from qwen_tune.options import load
    from qwen_tune.methods.sft import METHOD

    return load(METHOD, ["--data_path", "x.json", "--use_lora", "True", "--lora_r", "4", "--lora_alpha", "8", *argv]).lora.adapter_options()


def batch(n_tokens: int = 24, seed: int = 1) -> dict:
    """One packed row of two samples, the second half of each supervised."""
    from qwen_tune.data.collate import PackedCollator
    from qwen_tune.data.chat_format import IGNORE

    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(2):
        ids = torch.randint(0, 2000, (n_tokens,), generator=g).tolist()
        samples.append({"input_ids": ids, "labels": [IGNORE] * (n_tokens // 2) + ids[n_tokens // 2 :]})
    return PackedCollator()(samples)


def expert_lora(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".mlp.experts." in n and "lora_" in n}


@pytest.mark.parametrize("model_type", MOE)
def test_default_lora_adapts_trains_saves_and_reloads_the_routed_experts(model_type, tmp_path):
    """The defaults run (no dropout error), every layer's routed experts carry LoRA weights, one backward step reaches
    them, the routers stay frozen, and the saved adapter gives the same logits on a fresh base in plain PEFT (and
    merged, as `qwen-tune merge` does)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from qwen_tune.models.lora import add_lora
    from qwen_tune.train.loss import causal_lm_loss_sum

    lines = []
    model = add_lora(tiny(model_type), log=lines.append, **default_lora_options())
    assert model.peft_config["default"].lora_dropout == 0
    assert lines[0].startswith("lora: dropout 0 (not 0.05): the routed experts are adapted through PEFT's ParamWrapper")
    assert lines[-1].startswith("lora: adapting ") and lines[-1].endswith(EXPERTS_LINE)
    assert ("shared_expert.gate_proj, shared_expert.up_proj, shared_expert.down_proj" in lines[-1]) == (model_type in SHARED_EXPERT)

    experts = expert_lora(model)
    layers = SMALL["num_hidden_layers"]
    assert len(experts) == 2 * 2 * layers  # lora_A and lora_B of gate_up_proj and down_proj, in every layer
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not [n for n in trainable if ".mlp.gate." in n or "shared_expert_gate" in n]  # routers frozen

    loss, _ = causal_lm_loss_sum(model, batch())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in experts.items() if "lora_B" in n)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()  # every lora_B away from 0

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(".mlp.experts." in k for k in saved) == len(experts)
    assert (sum(".shared_expert." in k for k in saved) == 2 * 3 * layers) == (model_type in SHARED_EXPERT)

    row = batch(seed=2)
    inputs = {k: row[k] for k in ("input_ids", "position_ids")}
    with torch.no_grad():
        trained = model.eval()(**inputs).logits
        reloaded = PeftModel.from_pretrained(tiny(model_type), tmp_path).eval()
        torch.testing.assert_close(reloaded(**inputs).logits, trained)
        with reloaded.disable_adapter():
            assert (reloaded(**inputs).logits - trained).abs().max() > 1e-2  # the adapter changes the logits
        torch.testing.assert_close(reloaded.merge_and_unload()(**inputs).logits, trained, rtol=1e-4, atol=1e-4)


def test_an_explicit_dropout_on_an_moe_model_is_a_one_line_error_and_dense_models_keep_it():
    """PEFT's ParamWrapper (the routed experts' adapter) takes no dropout: `--lora_dropout 0.1` on an MoE model says
    what to do instead; on a dense model 0.1 is used, and unset stays the seed's 0.05 with PEFT's own all-linear."""
    from qwen_tune.errors import UserError
    from qwen_tune.models.lora import add_lora

    with pytest.raises(UserError) as error:
        add_lora(tiny("qwen3_moe"), log=print, **default_lora_options("--lora_dropout", "0.1"))
    message = str(error.value)
    assert "\n" not in message and message.startswith("--lora_dropout 0.1: the routed experts of this qwen3_moe model")
    assert "leave --lora_dropout unset" in message and "or pass 0" in message

    assert add_lora(tiny("qwen3_moe"), log=print, **default_lora_options("--lora_dropout", "0"))  # 0 is what it takes
    dense = add_lora(tiny("qwen3"), log=print, **default_lora_options("--lora_dropout", "0.1")).peft_config["default"]
    assert dense.lora_dropout == 0.1
    lines = []
    dense = add_lora(tiny("qwen3"), log=lines.append, **default_lora_options()).peft_config["default"]
    assert dense.lora_dropout == 0.05 and not dense.target_parameters
    assert dense.target_modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert lines == ["lora: adapting q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"]


def test_a_target_list_can_name_the_experts_or_leave_them_out():
    """`--lora_target_modules q_proj,v_proj` adapts no expert (so the usual 0.05 dropout applies); adding `experts`
    adapts both stacked weights, `gate_up_proj` only that one."""
    from qwen_tune.models.lora import add_lora

    def adapted(targets: str) -> tuple[str, float]:
        lines = []
        model = add_lora(tiny("qwen3_moe"), log=lines.append, **default_lora_options("--lora_target_modules", targets))
        return lines[-1], model.peft_config["default"].lora_dropout

    assert adapted("q_proj,v_proj") == ("lora: adapting q_proj, v_proj; router frozen; routed experts frozen", 0.05)
    assert adapted("q_proj,experts") == (f"lora: adapting q_proj, {EXPERTS_LINE}", 0)
    assert adapted("gate_up_proj")[0] == "lora: adapting experts.gate_up_proj (routed experts, 4 per layer); router frozen"


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3_next"])
def test_q_lora_says_what_stays_unquantized_and_still_adapts_the_experts(model_type, tmp_path):
    """bitsandbytes quantizes nn.Linear only: the routed experts stay in the load dtype (bfloat16 here, not upcast to
    float32 by PEFT's k-bit preparation), one line says so and how much of the model that is, and their LoRA weights
    still train. On qwen3_next the 4-bit shared expert cannot be adapted (PEFT would reload its names as experts):
    one line says it stays frozen."""
    from qwen_tune.models.lora import add_lora
    from qwen_tune.models.model import load_model
    from qwen_tune.train.loss import causal_lm_loss_sum

    tiny(model_type).save_pretrained(tmp_path)
    lines = []
    model = add_lora(load_model(str(tmp_path), dtype=torch.bfloat16, q_lora=True), q_lora=True, log=lines.append,
                     **default_lora_options())
    assert any(line.startswith("q_lora: routed experts (0.1M parameters, 1% of the model) stay in bfloat16: "
                               "bitsandbytes quantizes nn.Linear only") for line in lines), lines
    assert lines[-1].endswith(EXPERTS_LINE)
    frozen = [line for line in lines if "stay frozen" in line]
    assert frozen == (["lora: shared_expert.gate_proj, shared_expert.up_proj, shared_expert.down_proj stay frozen: PEFT "
                       "reads these names on qwen3_next as the transformers-4 experts', and a 4-bit weight cannot be "
                       "adapted another way"] if model_type == "qwen3_next" else [])
    stacked = [p for n, p in model.named_parameters() if ".mlp.experts." in n and n.endswith(("gate_up_proj", "down_proj"))]
    assert stacked and all(p.dtype == torch.bfloat16 for p in stacked)

    with torch.autocast("cpu", dtype=torch.bfloat16):  # a training step under the Trainer's bf16 mixed precision
        loss, _ = causal_lm_loss_sum(model.train(), batch())
    loss.backward()
    assert all(p.grad.abs().sum() > 0 for n, p in expert_lora(model).items() if "lora_B" in n)


def sft_trainer(model, tmp_path):
    from transformers import TrainingArguments

    from qwen_tune.methods.sft import SFTLossTrainer

    return SFTLossTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))


def test_the_router_load_balancing_loss_joins_the_sft_loss_when_the_config_asks(tmp_path):
    """With `output_router_logits` the training loss is the cross-entropy plus router_aux_loss_coef times the
    model's own aux_loss, which is logged as `aux_loss`; without it (transformers' default) nothing changes.
    Evaluation reports the language-model loss alone either way."""
    from qwen_tune.models.lora import add_lora

    inputs = batch()
    n = int((inputs["labels"][:, 1:] != -100).sum())
    model = add_lora(tiny("qwen3_moe", router_aux_loss_coef=0.5), log=print, **default_lora_options())
    without = sft_trainer(model, tmp_path)
    plain, plain_eval = without.compute_loss(model, inputs, num_items_in_batch=n), without.compute_loss(model, inputs)
    without.log({"loss": plain.item()})
    assert "aux_loss" not in without.state.log_history[-1]

    model.config.output_router_logits = True
    with torch.no_grad():
        aux = model(**{k: inputs[k] for k in ("input_ids", "position_ids")}).aux_loss  # the model's own
    assert aux > 0
    trainer = sft_trainer(model, tmp_path)
    with_aux = trainer.compute_loss(model, inputs, num_items_in_batch=n)
    torch.testing.assert_close(with_aux - plain, 0.5 * aux, rtol=1e-5, atol=1e-6)
    with_aux.backward()  # the router loss reaches the adapter through the hidden states the router reads
    trainer.log({"loss": with_aux.item()})
    assert trainer.state.log_history[-1]["aux_loss"] == pytest.approx(aux.item(), rel=1e-5)
    torch.testing.assert_close(trainer.compute_loss(model, inputs), plain_eval)


def test_the_router_load_balancing_loss_joins_the_dpo_loss_when_the_config_asks(tmp_path, tokenizer):
    import copy

    from qwen_tune.data.chat_format import resolve_format
    from qwen_tune.data.collate import PackedPairCollator
    from qwen_tune.data.pairs import encode_pairs
    from qwen_tune.methods.dpo import DPOLossTrainer, DPOTrainingArguments
    from qwen_tune.models.lora import add_lora

    pairs, _ = encode_pairs(f"{DATA}/preference_example.jsonl", resolve_format(copy.copy(tokenizer)), 512, split_prompt=True)
    inputs = PackedPairCollator()([pairs[i] for i in range(2)])
    model = add_lora(tiny("qwen3_moe", router_aux_loss_coef=0.5), log=print, **default_lora_options()).train()

    def loss():
        args = DPOTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
        return DPOLossTrainer(model=model, args=args).compute_loss(model, inputs)

    plain = loss()
    model.config.output_router_logits = True
    keys = ("input_ids", "position_ids")
    with torch.no_grad():
        aux = model(**{k: inputs[k] for k in keys}).aux_loss
    torch.testing.assert_close(loss() - plain, 0.5 * aux, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sft_cli_with_default_lora_options_on_a_qwen3_moe_checkpoint(tmp_path, tokenizer):
    """A user's run: `qwen-tune sft --use_lora True` and nothing else about LoRA, on a qwen3_moe checkpoint whose config
    asks for the router loss. It trains (no dropout traceback), says what it adapts and why the dropout is 0, logs
    aux_loss, saves the routed experts' LoRA weights, and the model card says what the log said."""
    from safetensors.torch import load_file

    checkpoint = str(tmp_path / "qwen3_moe")
    tiny("qwen3_moe", output_router_logits=True).save_pretrained(checkpoint)
    save_tokenizer(tokenizer, checkpoint)
    out = tmp_path / "out"
    proc = run_cli("sft", "--model_name_or_path", checkpoint, "--data_path", f"{DATA}/sft_example.json", "--output_dir", str(out),
                   "--use_lora", "True", "--max_steps", "2", "--per_device_train_batch_size", "2", "--report_to", "none",
                   "--save_strategy", "no")
    adapted = f"lora: adapting q_proj, k_proj, v_proj, o_proj, {EXPERTS_LINE}"
    assert adapted in proc.stderr.splitlines()
    assert "lora: dropout 0 (not 0.05): the routed experts are adapted through PEFT's ParamWrapper" in proc.stderr
    assert "  aux_loss " in proc.stdout  # the progress lines
    saved = load_file(out / "adapter_model.safetensors")
    assert sum(".mlp.experts." in k and "lora_B" in k for k in saved) == 2 * SMALL["num_hidden_layers"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"] and config["lora_dropout"] == 0
    card = assert_qwen_tune_card(out)  # README.md, in place of the placeholder PEFT's save_pretrained writes
    assert f"| lora_adapted | {adapted.removeprefix('lora: adapting ')} |" in card
