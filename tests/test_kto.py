"""KTO (`qwen-tune kto`): preference learning from replies labelled desirable or undesirable one at a time. Its data is
validated with file and line, its loss is TRL's KTOTrainer formula (hand-computed values, and on a real packed batch
against log-probs from full logits), and a LoRA run raises log p(polite) - log p(rude) on held-out prompts."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess

import pytest
import torch

from helpers import DATA, ROOT, assert_qwen_tune_card, fresh_env, logprob_margins
from pairs_gen import HELD_OUT_SUBJECTS, TRAIN_SUBJECTS, polite_pairs, write_jsonl


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_losses_on_hand_computed_examples():
    """Both loss types of TRL's KTOTrainer on numbers small enough to check by hand."""
    from qwen_tune.methods.kto import kto_loss

    logratios = torch.tensor([2.0, -1.0, 0.5, 3.0], dtype=torch.float64)
    desirable = torch.tensor([True, False, True, False])
    kl = torch.tensor(0.5, dtype=torch.float64)
    # kto, beta 0.1: desirable 1 - sigmoid(0.1 * (logratio - kl)), undesirable 1 - sigmoid(0.1 * (kl - logratio))
    losses = kto_loss(logratios, desirable, kl, beta=0.1, loss_type="kto")
    expected = [1 - sigmoid(0.15), 1 - sigmoid(0.15), 1 - sigmoid(0.0), 1 - sigmoid(-0.25)]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64))
    # weights multiply each kind's losses
    weighted = kto_loss(logratios, desirable, kl, beta=0.1, loss_type="kto", desirable_weight=2.0, undesirable_weight=0.5)
    torch.testing.assert_close(weighted, losses * torch.tensor([2.0, 0.5, 2.0, 0.5], dtype=torch.float64))
    # apo_zero_unpaired has no KL: desirable 1 - sigmoid(beta * logratio), undesirable sigmoid(beta * logratio)
    losses = kto_loss(logratios, desirable, kl, beta=1.0, loss_type="apo_zero_unpaired")
    torch.testing.assert_close(losses, torch.tensor([1 - sigmoid(2.0), sigmoid(-1.0), 1 - sigmoid(0.5), sigmoid(3.0)],
                                                    dtype=torch.float64))
    # a desirable reply's loss falls as its reward rises, an undesirable one's rises
    up = kto_loss(logratios + 1, desirable, kl, beta=0.1, loss_type="kto")
    assert (up[desirable] < kto_loss(logratios, desirable, kl, 0.1, "kto")[desirable]).all()
    assert (up[~desirable] > kto_loss(logratios, desirable, kl, 0.1, "kto")[~desirable]).all()


def trl_kto_loss(logps, ref_logps, kl_logps, ref_kl_logps, labels, beta, loss_type, desirable_weight, undesirable_weight):
    """TRL's KTOTrainer._compute_loss from the summed log-probs on, transcribed (trl/trainer/kto_trainer.py, 1.16)."""
    if loss_type == "kto":
        kl = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    else:
        kl = torch.zeros(1, dtype=logps.dtype)
    chosen_logratios = logps[labels] - ref_logps[labels]
    rejected_logratios = logps[~labels] - ref_logps[~labels]
    if loss_type == "kto":
        chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
        rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    else:
        chosen_losses = 1 - torch.sigmoid(beta * chosen_logratios)
        rejected_losses = torch.sigmoid(beta * rejected_logratios)
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return losses.nanmean(), kl, beta * chosen_logratios, beta * rejected_logratios


BATCH = (0, 1, 2, 5, 7)  # rows of data/kto_example.jsonl: desirable, undesirable, desirable, undesirable, undesirable


@pytest.fixture(scope="module")
def policy_and_reference(base_model_path, tokenizer):
    """The embedded model in float64 as the reference, and as the policy a copy nudged towards the
    example replies (Adam, 3 steps), so that log-ratios are not 0 and the KL estimate is above its clamp at 0."""
    from transformers import AutoModelForCausalLM

    from qwen_tune.data.chat_format import resolve_format
    from qwen_tune.data.collate import packed_replies
    from qwen_tune.data.unpaired import encode_unpaired
    from qwen_tune.train.loss import sequence_logprobs

    reference = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=torch.float64).eval()
    policy = copy.deepcopy(reference)
    rows, _ = encode_unpaired(f"{DATA}/kto_example.jsonl", resolve_format(copy.copy(tokenizer)), 512)
    batch = packed_replies([(rows[i]["prompt_ids"], rows[i]["completion_ids"]) for i in BATCH])
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-4)
    for _ in range(3):
        optimizer.zero_grad()
        (-sequence_logprobs(policy, batch, len(BATCH)).sum()).backward()
        optimizer.step()
    return policy.eval(), reference


def test_the_loss_and_metrics_on_a_packed_batch_equal_trls_formula_on_full_logits(tokenizer, policy_and_reference, tmp_path):
    """The trainer's loss on a packed batch (and on a padded one) equals TRL's formula fed summed log-probs from each
    sequence's full logits, the KL term estimated on each prompt with the previous sample's reply; it logs TRL's metric
    names with TRL's values. In float64, so that any difference is the formula, not the summation order."""
    from qwen_tune.data.chat_format import resolve_format
    from qwen_tune.data.collate import UnpairedCollator
    from qwen_tune.data.unpaired import encode_unpaired
    from qwen_tune.methods.kto import KTOLossTrainer, KTOTrainingArguments

    policy, reference = policy_and_reference
    rows, report = encode_unpaired(f"{DATA}/kto_example.jsonl", resolve_format(copy.copy(tokenizer)), 512)
    assert (report.samples, report.kept, report.desirable) == (20, 20, 10)
    features = [rows[i] for i in BATCH]
    labels = torch.tensor([f["label"] for f in features])
    assert labels.tolist() == [True, False, True, False, False]

    def logps(model, replies):
        out = []
        for f, reply in zip(features, replies):
            ids = torch.tensor([f["prompt_ids"] + reply])
            with torch.no_grad():
                logits = model(ids).logits[0, len(f["prompt_ids"]) - 1 : -1]
            out.append(logits.log_softmax(-1).gather(1, ids[0, len(f["prompt_ids"]):, None]).sum())
        return torch.stack(out)

    replies = [f["completion_ids"] for f in features]
    shifted = replies[-1:] + replies[:-1]  # sample i with sample i-1's reply
    sums = {name: logps(model, r) for name, model, r in [("policy", policy, replies), ("reference", reference, replies),
                                                          ("policy_kl", policy, shifted), ("reference_kl", reference, shifted)]}
    for loss_type in ("kto", "apo_zero_unpaired"):
        settings = dict(beta=0.5, loss_type=loss_type, desirable_weight=1.5, undesirable_weight=0.5)
        expected, kl, chosen_rewards, rejected_rewards = trl_kto_loss(sums["policy"], sums["reference"], sums["policy_kl"],
                                                                      sums["reference_kl"], labels, **settings)
        if loss_type == "kto":
            assert kl.item() > 0  # the KL term is really in play
        args = KTOTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **settings)
        trainer = KTOLossTrainer(model=policy, reference=reference, args=args)
        policy.train()
        for packed in (True, False):
            with torch.no_grad():
                loss = trainer.compute_loss(policy, UnpairedCollator(packed, tokenizer.pad_token_id)(features))
            torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
        logged = trainer.averaged("train")  # both batches: the same values twice
        wanted = {"kl": kl.mean(), "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                  "rewards/margins": chosen_rewards.mean() - rejected_rewards.mean(),
                  "logps/chosen": sums["policy"][labels].mean(), "logps/rejected": sums["policy"][~labels].mean()}
        assert logged == pytest.approx({k: v.item() for k, v in wanted.items()}, rel=1e-6, abs=1e-6)
    policy.eval()


def test_unpaired_data_is_validated_with_file_and_line(tmp_path):
    """Both record forms are read; every problem names its file and line; a file of one label kind is refused."""
    from qwen_tune.data.read import load_unpaired
    from qwen_tune.errors import DataError

    user = {"role": "user", "content": "Hi"}
    good = {"role": "assistant", "content": "Hello! How can I help?"}
    bad = tmp_path / "bad.jsonl"
    records = [
        {"messages": [user, good], "label": True},  # 1: fine
        {"messages": [user, good]},  # 2: no label
        {"messages": [user, good], "label": "yes"},  # 3: not a boolean
        {"prompt": "Hi", "chosen": "a", "rejected": "b", "label": True},  # 4: a pair
        {"messages": [user], "label": False},  # 5: no reply
        {"prompt": [user], "completion": [user], "label": False},  # 6: the completion is not the assistant's
        {"prompt": "Hi", "completion": "Go away.", "label": False},  # 7: fine
    ]
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError) as caught:
        load_unpaired(str(bad))
    problems = caught.value.problems
    assert problems == [
        f'{bad}:2: missing "label"; ' + problems[0].split('missing "label"; ')[1],
        f"{bad}:3: label is \"yes\"; expected true (a desirable reply) or false (an undesirable one)",
        f'{bad}:4: this is a preference pair (it has "chosen"/"rejected"): train on pairs with qwen-tune dpo, orpo or '
        "simpo; " + problems[2].split("or simpo; ")[1],
        f'{bad}:5: messages ends with a user turn; the reply that "label" judges is the assistant turn at the end',
        f"{bad}:6: completion[0] is a user turn; completion must hold assistant messages only",
    ], problems
    fine = [records[0], records[6]]
    (tmp_path / "ok.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fine))
    replies = load_unpaired(str(tmp_path / "ok.jsonl"))
    assert [(r.prompt, r.reply, r.desirable) for r in replies] == [
        ([user], [good], True), ([user], [{"role": "assistant", "content": "Go away."}], False)]
    one_kind = tmp_path / "thumbs_up.jsonl"
    one_kind.write_text(json.dumps(records[0]) + "\n")
    with pytest.raises(DataError, match=f"{one_kind}: every sample is labelled true \\(desirable\\); KTO learns from the contrast"):
        load_unpaired(str(one_kind))


def test_kto_options_are_checked_before_anything_runs(tmp_path, capsys):
    """The KL estimate needs two samples per device batch; the weights must be positive; dpo's loss types are not KTO's."""
    from qwen_tune.errors import UserError
    from qwen_tune.methods import kto
    from qwen_tune.options import load

    out = ["--data_path", "replies.jsonl", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(UserError, match="--per_device_train_batch_size 1: KTO estimates its KL term"):
        load(kto.METHOD, [*out, "--per_device_train_batch_size", "1"])
    assert load(kto.METHOD, [*out, "--per_device_train_batch_size", "1", "--loss_type", "apo_zero_unpaired"]).train["loss_type"] == "apo_zero_unpaired"
    with pytest.raises(UserError, match="--undesirable_weight 0.0: must be > 0"):
        load(kto.METHOD, [*out, "--undesirable_weight", "0"])
    with pytest.raises(SystemExit):  # argparse's own message and exit status 2, as for every choice option
        load(kto.METHOD, [*out, "--loss_type", "sigmoid"])
    assert "invalid choice: 'sigmoid' (choose from 'kto', 'apo_zero_unpaired')" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown option --simpo_gamma"):
        load(kto.METHOD, [*out, "--simpo_gamma", "1"])
    defaults = load(kto.METHOD, out).train
    assert (defaults["beta"], defaults["loss_type"], defaults["desirable_weight"], defaults["undesirable_weight"]) == (0.1, "kto", 1.0, 1.0)


def unpaired(pairs: list[dict]) -> list[dict]:
    """Each pair as two labelled replies: the polite one desirable, the rude one not."""
    return [{"id": f"{p['id']}-{side}", "prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
            for p in pairs for side in ("chosen", "rejected")]


@pytest.mark.slow
def test_kto_lora_raises_the_desirable_over_undesirable_margin_on_held_out_prompts(tmp_path, tokenizer, base_model_path):
    """The recipe with a LoRA adapter on polite (desirable) and rude (undesirable) replies about 20 subjects, an eval set
    of others: TRL's eval metric names, and the adapter reloaded in a fresh process prefers the polite reply of held-out
    pairs (the log-prob margin rises on >= 90 % of them)."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    train = write_jsonl(tmp_path / "train.jsonl", unpaired(polite_pairs(1, 24, TRAIN_SUBJECTS)))
    held_out_pairs = polite_pairs(2, 12, HELD_OUT_SUBJECTS)
    held_out = write_jsonl(tmp_path / "held_out.jsonl", held_out_pairs)
    held_out_replies = write_jsonl(tmp_path / "held_out_replies.jsonl", unpaired(held_out_pairs))
    before = logprob_margins(AutoModelForCausalLM.from_pretrained(base_model_path).eval(), tokenizer, held_out)
    out = tmp_path / "kto"
    proc = subprocess.run(["sh", "recipes/train_kto.sh", "-d", train, "-o", str(out), "--eval_data_path", held_out_replies,
                           "--system_message", "", "--use_lora", "True", "--max_steps", "6", "--learning_rate", "5e-3",
                           "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1"],
                          cwd=ROOT, env=fresh_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "recipes/train_kto.yaml" in proc.stderr and "48 replies (24 desirable, 24 undesirable kept)" in proc.stderr
    assert all(f"  {name} " in proc.stdout for name in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins"))
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["eval_rewards/margins"] > 0 and "eval_kl" in metrics, metrics
    assert os.path.isfile(out / "adapter_model.safetensors")
    assert_qwen_tune_card(out)
    after = logprob_margins(AutoPeftModelForCausalLM.from_pretrained(str(out)).eval(), tokenizer, held_out)
    print(f"held-out log-prob margin: {before.mean():.2f} before KTO, {after.mean():.2f} after")
    assert after.mean() > before.mean() + 3.0, (before.mean(), after.mean())
    assert (after > before).float().mean() >= 0.9
