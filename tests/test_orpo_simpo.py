"""ORPO (`qwen-tune orpo`) and SimPO (`qwen-tune simpo`), the preference methods without a reference model: their
losses are TRL's formulas (hand-computed values, and TRL's own loss functions on a real batch), and each raises
log p(chosen) - log p(rejected) on held-out pairs, ORPO from a base model that never saw SFT."""

from __future__ import annotations

import json
import math
import os
import subprocess
from decimal import Decimal, getcontext
from types import SimpleNamespace

import pytest
import torch

from helpers import DATA, ROOT, assert_qwen_tune_card, fresh_env, logprob_margins
from pairs_gen import HELD_OUT_SUBJECTS, TRAIN_SUBJECTS, polite_pairs, write_jsonl


def trl_losses(monkeypatch):
    """TRL's own ORPO and CPO (SimPO) trainer classes, whose loss methods need no model."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    return ORPOTrainer, CPOTrainer


def trl_self(**settings):
    """What TRL's loss methods read of their trainer."""
    return SimpleNamespace(accelerator=SimpleNamespace(device="cpu"), **settings)


def test_orpo_and_simpo_losses_on_hand_computed_pairs(monkeypatch):
    from qwen_tune.methods.orpo import log1mexp, orpo_loss
    from qwen_tune.methods.simpo import simpo_loss
    from qwen_tune.train.loss import SequenceLogprobs

    ORPOTrainer, CPOTrainer = trl_losses(monkeypatch)
    getcontext().prec = 50

    # ORPO: chosen P = 1/2 per token on average (3 tokens), rejected 1/4 (2 tokens): odds 1 and 1/3, so the log odds
    # ratio is log 3 and log sigmoid of it log 3/4; the NLL is the chosen tokens' mean, log 2.
    chosen = SequenceLogprobs(torch.tensor([3 * math.log(0.5)], dtype=torch.float64), torch.tensor([3]), None)
    rejected = SequenceLogprobs(torch.tensor([2 * math.log(0.25)], dtype=torch.float64), torch.tensor([2]), None)
    loss, nll, ratio, log_odds = orpo_loss(chosen, rejected, beta=0.1)
    assert log_odds.item() == pytest.approx(math.log(3)) and ratio.item() == pytest.approx(math.log(0.75))
    assert nll.item() == pytest.approx(math.log(2)) and loss.item() == pytest.approx(math.log(2) - 0.1 * math.log(0.75))
    trl = ORPOTrainer.odds_ratio_loss(trl_self(beta=0.1), chosen.means(), rejected.means())
    assert (nll - trl[0].mean()).item() == pytest.approx(loss.item())  # TRL: loss = nll - mean(beta * log sigmoid)
    assert trl[3].item() == pytest.approx(ratio.item()) and trl[4].item() == pytest.approx(log_odds.item())

    # The NLL is the mean over all of the batch's chosen tokens (as CrossEntropyLoss over the chosen labels), not the
    # mean of per-pair means: 1 token at log p -1 and 3 tokens at -2 average -7/4, not -3/2.
    two = SequenceLogprobs(torch.tensor([-1.0, -6.0]), torch.tensor([1, 3]), None)
    assert orpo_loss(two, two, beta=0.1)[1].item() == pytest.approx(7 / 4)

    # Average log-probs on both sides of log1mexp's branch at -log 2, against TRL's odds_ratio_loss.
    chosen_logps = torch.tensor([-0.05, -0.5, -0.7, -3.0, -14.0])
    rejected_logps = torch.tensor([-0.9, -0.2, -0.69, -2.5, -15.0])
    x = torch.tensor([-1e-6, -0.3, -0.69, -0.7, -5.0, -40.0], dtype=torch.float64)
    exact = torch.tensor([float((1 - Decimal(v).exp()).ln()) for v in x.tolist()], dtype=torch.float64)  # 50 digits
    torch.testing.assert_close(log1mexp(x), exact, rtol=1e-12, atol=0)
    ones = torch.ones(5, dtype=torch.long)
    loss, nll, ratio, log_odds = orpo_loss(SequenceLogprobs(chosen_logps, ones, None), SequenceLogprobs(rejected_logps, ones, None), 0.25)
    losses, chosen_rewards, rejected_rewards, trl_ratio, trl_log_odds = ORPOTrainer.odds_ratio_loss(trl_self(beta=0.25), chosen_logps, rejected_logps)
    torch.testing.assert_close(loss, nll - losses.mean())
    torch.testing.assert_close((ratio.mean(), log_odds.mean()), (trl_ratio, trl_log_odds))

    # SimPO: average log-probs -1 (chosen) and -2, beta 2, gamma 0.5: -log sigmoid(2 * (-1 + 2) - 0.5) = log(1 + e^-1.5).
    loss, chosen_reward, rejected_reward = simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.5)))
    assert (chosen_reward.item(), rejected_reward.item()) == (-2.0, -4.0)
    simpo = trl_self(alpha=0.0, loss_type="simpo", simpo_gamma=0.5, beta=2.0, label_smoothing=0.0)
    torch.testing.assert_close(simpo_loss(chosen_logps, rejected_logps, 2.0, 0.5), CPOTrainer.cpo_loss(simpo, chosen_logps, rejected_logps))


def test_the_losses_and_metrics_on_packed_pairs_equal_trls_on_full_logits(tokenizer, base_model_path, tmp_path, monkeypatch):
    """Each trainer's loss on a packed batch equals TRL's loss function fed TRL's own average log-probs
    (`get_batch_logps`) from the full logits of the padded batch, and it logs TRL's metric names with TRL's values.
    ORPO's NLL is the chosen replies' cross-entropy (TRL's also covers the prompt's tokens; see methods/orpo.py).
    In float64, so that any difference is the formula, not the summation order."""
    import copy

    from transformers import AutoModelForCausalLM

    from qwen_tune.data.chat_format import resolve_format
    from qwen_tune.data.collate import PackedPairCollator, PaddedPairCollator
    from qwen_tune.data.pairs import encode_pairs
    from qwen_tune.methods import orpo, simpo

    ORPOTrainer, CPOTrainer = trl_losses(monkeypatch)
    pairs, _ = encode_pairs(f"{DATA}/preference_example.jsonl", resolve_format(copy.copy(tokenizer)), 512, split_prompt=True)
    features = [pairs[i] for i in range(2)]
    model = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=torch.float64)
    padded = PaddedPairCollator(0)(features)
    assert (padded["attention_mask"] == 0).any()  # really padded
    with torch.no_grad():
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    chosen, rejected = ORPOTrainer.get_batch_logps(logits, padded["labels"], average_log_prob=True).chunk(2)

    losses, orpo_chosen, orpo_rejected, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(trl_self(beta=0.1), chosen, rejected)
    nll = torch.nn.CrossEntropyLoss()(logits[:2, :-1].reshape(-1, logits.shape[-1]), padded["labels"][:2, 1:].reshape(-1))
    simpo_losses, simpo_chosen, simpo_rejected = CPOTrainer.cpo_loss(
        trl_self(alpha=0.0, loss_type="simpo", simpo_gamma=0.5, beta=2.0, label_smoothing=0.0), chosen, rejected)
    del logits
    for trainer_class, arguments, expected, chosen_rewards, rejected_rewards, extra in [
        (orpo.ORPOLossTrainer, orpo.ORPOTrainingArguments, nll - losses.mean(), orpo_chosen, orpo_rejected,
         {"nll_loss": nll, "log_odds_ratio": log_odds_ratio, "log_odds_chosen": log_odds_chosen}),
        (simpo.SimPOLossTrainer, simpo.SimPOTrainingArguments, simpo_losses.mean(), simpo_chosen, simpo_rejected, {}),
    ]:
        trainer = trainer_class(model=model, args=arguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
        model.train()
        with torch.no_grad():
            loss = trainer.compute_loss(model, PackedPairCollator()(features))
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)  # ORPO's odds ratio is in float32, as TRL's
        wanted = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                  "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                  "rewards/margins": chosen_rewards - rejected_rewards, "logps/chosen": chosen, "logps/rejected": rejected, **extra}
        logged = {name: total / count for name, (total, count) in trainer.logged_metrics["train"].items()}
        # TRL's ORPO rewards are in float32: a margin of two of them is exact to about 1e-7
        assert logged == pytest.approx({name: value.mean().item() for name, value in wanted.items()}, rel=1e-6, abs=1e-6)


def test_each_command_refuses_what_it_does_not_read(tmp_path):
    """dpo's --loss_type means nothing to orpo or simpo, simpo's --simpo_gamma nothing to orpo; SimPO divides by beta."""
    from qwen_tune.errors import UserError
    from qwen_tune.methods import orpo, simpo
    from qwen_tune.options import load

    out = ["--data_path", "pairs.jsonl", "--output_dir", str(tmp_path / "out")]
    for method, option in [(orpo, "--loss_type"), (simpo, "--loss_type"), (orpo, "--simpo_gamma")]:
        with pytest.raises(UserError, match=f"unknown option {option}"):
            load(method.METHOD, [*out, option, "1"])
    with pytest.raises(UserError, match="--beta 0.0: SimPO's reward scale must be > 0"):
        load(simpo.METHOD, [*out, "--beta", "0"])
    assert (load(simpo.METHOD, out).train["beta"], load(simpo.METHOD, out).train["simpo_gamma"]) == (2.0, 0.5)


def run_recipe(recipe: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(["sh", f"recipes/{recipe}", *args], cwd=ROOT, env=fresh_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tokenizer, base_model_path):
    """24 training pairs, 12 held-out pairs about other subjects, and the base model's margins on the held-out ones."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("pairs")
    train = write_jsonl(d / "train.jsonl", polite_pairs(1, 24, TRAIN_SUBJECTS))
    held_out = write_jsonl(d / "held_out.jsonl", polite_pairs(2, 12, HELD_OUT_SUBJECTS))
    return train, held_out, logprob_margins(AutoModelForCausalLM.from_pretrained(base_model_path).eval(), tokenizer, held_out)


def assert_margins_rise(before: torch.Tensor, after: torch.Tensor, method: str) -> None:
    print(f"held-out log-prob margin: {before.mean():.2f} before {method}, {after.mean():.2f} after")
    assert after.mean() > before.mean() + 3.0, (before.mean(), after.mean())
    assert (after > before).float().mean() >= 0.9


@pytest.mark.slow
def test_orpo_from_a_base_model_raises_the_chosen_over_rejected_margin_on_held_out_pairs(tmp_path, tokenizer, pairs):
    """The recipe on the embedded base model (never fine-tuned on chat): 4 steps on 24 pairs about other subjects."""
    from transformers import AutoModelForCausalLM

    train, held_out, before = pairs
    out = tmp_path / "orpo"
    proc = run_recipe("train_orpo.sh", "-d", train, "-o", str(out), "--system_message", "", "--max_steps", "4",
                      "--learning_rate", "1e-3", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1")
    assert "recipes/train_orpo.yaml" in proc.stderr and "AutoModelForCausalLM" in proc.stderr
    assert all(f"  {name} " in proc.stdout for name in ("nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/accuracies"))
    assert_qwen_tune_card(out)
    assert_margins_rise(before, logprob_margins(AutoModelForCausalLM.from_pretrained(str(out)).eval(), tokenizer, held_out), "ORPO")


@pytest.mark.slow
def test_simpo_lora_raises_the_chosen_over_rejected_margin_and_reports_held_out_accuracy(tmp_path, tokenizer, pairs):
    """The recipe with a LoRA adapter and an eval set: TRL's eval metric names, and the reloaded adapter prefers the
    chosen replies of held-out pairs."""
    from peft import AutoPeftModelForCausalLM

    train, held_out, before = pairs
    out = tmp_path / "simpo"
    run_recipe("train_simpo.sh", "-d", train, "-o", str(out), "--eval_data_path", held_out, "--system_message", "",
               "--use_lora", "True", "--max_steps", "4", "--learning_rate", "5e-3", "--report_to", "none",
               "--save_strategy", "no", "--logging_steps", "1")
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["eval_rewards/accuracies"] >= 0.9 and metrics["eval_rewards/margins"] > 0, metrics
    assert os.path.isfile(out / "adapter_model.safetensors")
    assert_margins_rise(before, logprob_margins(AutoPeftModelForCausalLM.from_pretrained(str(out)).eval(), tokenizer, held_out), "SimPO")
