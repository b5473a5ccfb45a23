"""qwen-tune distill: the divergence is TRL's GKD formula, computed a chunk at a time at reply positions only, the data
and the teacher are checked before anything trains, and a small student distilled from a larger teacher answers like
it on prompts it never saw, where SFT on the same prompts (without the teacher's replies) cannot."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import warnings

import pytest
import torch
from transformers import TrainerCallback

from helpers import DATA, ROOT, fresh_env, generate_in_fresh_process, save_random_teacher
from qwen_tune.data.collate import packed_replies
from qwen_tune.errors import DataError, UserError
from qwen_tune.train.divergence import ReplyLogits, generalized_jsd, reply_divergences
from qwen_tune.train.loss import supervised_positions

BETAS = (0.0, 0.5, 0.9, 1.0)


def trl_generalized_jsd_loss():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's warning that trl.experimental may change
        from trl.experimental.gkd import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


def test_hand_computed_forward_and_reverse_kl():
    """Student (0.5, 0.5), teacher (0.9, 0.1): forward KL(t || s) = 0.9 ln 1.8 + 0.1 ln 0.2, reverse KL(s || t) =
    0.5 ln(0.5 / 0.9) + 0.5 ln 5; the JSD at beta 0.5 against the mixture (0.7, 0.3); all at temperature 1."""
    student, teacher = torch.tensor([[0.0, 0.0]], dtype=torch.float64), torch.tensor([[math.log(0.9), math.log(0.1)]], dtype=torch.float64)
    forward = 0.9 * math.log(1.8) + 0.1 * math.log(0.2)
    reverse = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(5)
    jsd = 0.5 * (0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3)) + 0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3))
    for beta, expected in ((0.0, forward), (1.0, reverse), (0.5, jsd)):
        assert generalized_jsd(student, teacher, beta).item() == pytest.approx(expected, rel=1e-12)
    # temperature 2 halves both sets of logits: the student stays uniform, the teacher becomes (3/4, 1/4)
    assert generalized_jsd(student, teacher, 0.0, temperature=2.0).item() == pytest.approx(
        0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_divergences_equal_trls_generalized_jsd_loss(temperature):
    """On random (batch, length, vocab) logits with masked positions, the mean over supervised positions of our per-token
    divergence is TRL's GKDTrainer.generalized_jsd_loss (batchmean over the labels' mask), for every kind of beta."""
    trl_loss = trl_generalized_jsd_loss()
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, dtype=torch.float64) * 3, torch.randn(2, 5, 11, dtype=torch.float64) * 3
    labels = torch.tensor([[-100, 3, 4, -100, 1], [-100, -100, 7, 2, 2]])
    mask = labels != -100
    for beta in BETAS:
        ours = generalized_jsd(student[mask], teacher[mask], beta, temperature).mean()
        theirs = trl_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12, msg=f"beta {beta}")


def small_models():
    """The embedded model as the student and a differently seeded one of the same shape as the teacher (float64)."""
    from transformers import AutoModelForCausalLM

    from qwen_tune.models.model import embedded_model_path

    student = AutoModelForCausalLM.from_pretrained(embedded_model_path(), dtype=torch.float64)
    torch.manual_seed(1)
    teacher = AutoModelForCausalLM.from_config(student.config, dtype=torch.float64).eval()
    return student, teacher


def test_chunked_reply_divergences_and_gradients_equal_full_logits_of_each_sequence_alone():
    """A packed batch of (prompt, reply) sequences: the divergence at each reply position, computed from logits made a
    few rows at a time, equals the one from the models' full logits of each sequence alone, and so do the student's
    gradients; no gradient reaches the teacher."""
    student, teacher = small_models()
    sides = [([151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198], [9707, 0, 151645]),
             ([151644, 872, 198, 14990, 151645, 198, 151644, 77091, 198], [14990, 11, 1879, 151645])]
    batch = packed_replies(sides)
    (rows, cols), _ = supervised_positions(batch["labels"])
    for beta in BETAS:
        student.zero_grad()
        chunked = reply_divergences(ReplyLogits(student, batch, rows, cols), ReplyLogits(teacher, batch, rows, cols),
                                    beta, temperature=0.9, chunk_size=2)
        chunked.sum().backward()
        chunked_grads = {n: p.grad.clone() for n, p in student.named_parameters()}
        student.zero_grad()
        alone = []
        for prompt, reply in sides:  # the positions that predict the reply's tokens
            ids = torch.tensor([prompt + reply])
            at = slice(len(prompt) - 1, len(prompt) + len(reply) - 1)
            alone.append(generalized_jsd(student(ids).logits[0, at], teacher(ids).logits[0, at].detach(), beta, 0.9))
        full = torch.cat(alone)
        full.sum().backward()
        torch.testing.assert_close(chunked, full, rtol=1e-10, atol=1e-12)
        for name, p in student.named_parameters():
            torch.testing.assert_close(chunked_grads[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)
        assert len(chunked) == 7 and all(p.grad is None for p in teacher.parameters())


def draws(lmbda: float, steps: range, micro_batches: int = 2) -> list[bool]:
    """DistillTrainer.draw_on_policy over `steps` (each of `micro_batches` gradient-accumulation micro-batches), as a
    fresh trainer (a rank, or a resumed run) makes them."""
    from types import SimpleNamespace

    from qwen_tune.methods.distill import DistillTrainer

    trainer = SimpleNamespace(args=SimpleNamespace(seed=42, lmbda=lmbda), state=SimpleNamespace(global_step=0),
                              drawn_at=None, micro_batch=0)
    drawn = []
    for step in steps:
        trainer.state.global_step = step
        drawn += [DistillTrainer.draw_on_policy(trainer) for _ in range(micro_batches)]
    return drawn


def test_on_policy_draws_are_the_same_on_every_rank_and_after_a_resume():
    """With 0 < lmbda < 1 each micro-batch is drawn on-policy with probability lmbda (TRL's GKD); the draw depends on the
    seed, the step and the micro-batch only, so every rank makes the same one (under ZeRO-3 they sample together) and a
    run resumed at step 100 makes the draws of the uninterrupted run."""
    half = draws(0.5, range(200))
    assert 0.4 < sum(half) / len(half) < 0.6 and half == draws(0.5, range(200))
    assert draws(0.5, range(100, 200)) == half[200:]
    assert not any(draws(0.0, range(50))) and all(draws(1.0, range(50)))


def distill_main(*argv: str, callbacks: tuple = ()):
    from qwen_tune.methods.distill import main

    return main(list(argv), callbacks=callbacks)


class Logged(TrainerCallback):
    """Every line the trainer logs."""

    def __init__(self):
        self.lines = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.lines.append(dict(logs or {}))


def test_data_and_teacher_problems_are_named_before_training(tmp_path, base_model_path):
    """Off-policy batches need the dataset's replies: each prompt without one is named with its file and line; a field
    distill does not read (a KTO label) is refused; a teacher with another tokenizer, or a LoRA adapter as the teacher,
    is refused with the reason; the options are checked."""
    from qwen_tune.models.tokenizer import load_tokenizer, save_tokenizer

    out = str(tmp_path / "out")
    common = ["--teacher", base_model_path, "--output_dir", out, "--report_to", "none"]
    with pytest.raises(DataError) as e:
        distill_main("--data_path", f"{DATA}/distill_example.jsonl", "--lmbda", "0.5", *common)
    assert f"{DATA}/distill_example.jsonl:1: no reply" in str(e.value) and "--lmbda below 1" in str(e.value)
    assert e.value.total == 4  # lines 1, 4, 6 and 8 are prompts only
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text(json.dumps({"prompt": "Hi", "completion": "Hello!", "label": True}) + "\n")
    with pytest.raises(DataError, match=f'{labelled}:1: unknown field "label"'):
        distill_main("--data_path", str(labelled), *common)
    other = tmp_path / "other_tokenizer"
    tokenizer = load_tokenizer(base_model_path)
    tokenizer.add_tokens(["<|my_token|>"])
    save_tokenizer(tokenizer, other)
    shutil.copy(os.path.join(base_model_path, "config.json"), other)
    with pytest.raises(UserError, match="its tokenizer is not the student's"):
        distill_main("--data_path", f"{DATA}/distill_example.jsonl", *common[2:], "--teacher", str(other))
    for flag, value in (("--beta", "1.5"), ("--lmbda", "-0.1"), ("--temperature", "0")):
        with pytest.raises(UserError, match=f"{flag} {value}"):
            distill_main("--data_path", f"{DATA}/distill_example.jsonl", *common, flag, value)
    with pytest.raises(UserError, match="--teacher is required"):
        distill_main("--data_path", f"{DATA}/distill_example.jsonl", "--output_dir", out)


@pytest.mark.parametrize("adapter", ["lora", "q_lora"])
def test_lora_and_qlora_students_train_on_their_own_replies(adapter, tmp_path, base_model_path):
    """The default, on-policy: the student's sampled replies (logged: every batch on-policy, their lengths) are where the
    divergence is taken; a LoRA adapter (on the 4-bit base with Q-LoRA) trains and is saved as one, its base recorded."""
    from safetensors.torch import load_file

    teacher = save_random_teacher(tmp_path / "teacher")
    out, logged = tmp_path / "lora", Logged()
    metrics = distill_main("--teacher", teacher, "--data_path", f"{DATA}/distill_example.jsonl", "--use_lora", "True",
                           "--q_lora", str(adapter == "q_lora"), "--max_steps", "2", "--per_device_train_batch_size", "4",
                           "--output_dir", str(out), "--report_to", "none", "--max_new_tokens", "4", callbacks=(logged,))
    assert metrics["train_loss"] > 0
    steps = [line for line in logged.lines if "loss" in line]
    assert [line["on_policy"] for line in steps] == [1.0, 1.0]
    assert all(1 <= line["completions/mean_length"] <= 4 for line in steps)
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors and any(n.endswith("lora_B.weight") and t.abs().max() > 0 for n, t in tensors.items())
    assert json.load(open(out / "adapter_config.json"))["base_model_name_or_path"] == base_model_path


COLOURS = {"red": "ROJO", "blue": "AZUL", "green": "VERDE", "white": "BLANCO", "black": "NEGRO", "yellow": "AMARILLO"}
TRAINED_ON = ["Say the colour {}", "Translate {}", "What is {}", "Colour: {}", "Tell me {}", "Name {}", "Word {}", "Please, {}"]
HELD_OUT = ["Now translate {}", "Quick: {}", "Spanish for {}", "Answer {}"]


def colour_data(path, templates, reply) -> str:
    rows = [{"messages": [{"role": "user", "content": t.format(c)}, {"role": "assistant", "content": reply(c)}]}
            for t in templates for c in COLOURS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A tiny Qwen2 twice the embedded model's depth, trained (SFT) to answer a colour with its Spanish name
    in capitals, on the training prompts and the held-out ones: it knows what the student will be asked. Built once for
    the tests of this module's "distill_teacher" group, which run on one worker."""
    tmp_path = tmp_path_factory.mktemp("teacher")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen_tune.methods.sft import main as sft
    from qwen_tune.models.model import EMBEDDED_CONFIG, set_generation_defaults
    from qwen_tune.models.tokenizer import load_tokenizer, save_tokenizer

    config = json.loads(EMBEDDED_CONFIG.read_text())
    config.pop("architectures")
    config.update(num_hidden_layers=4)
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(Qwen2Config(**config))
    set_generation_defaults(model)
    model.save_pretrained(tmp_path / "teacher_init")
    save_tokenizer(load_tokenizer(), tmp_path / "teacher_init")
    data = colour_data(tmp_path / "teacher.jsonl", TRAINED_ON + HELD_OUT, COLOURS.get)
    sft(["--model_name_or_path", str(tmp_path / "teacher_init"), "--data_path", data, "--output_dir", str(tmp_path / "teacher"),
         "--max_steps", "100", "--per_device_train_batch_size", "8", "--learning_rate", "5e-3", "--warmup_ratio", "0.05",
         "--model_max_length", "64", "--report_to", "none", "--disable_tqdm", "True"])
    return str(tmp_path / "teacher")


def greedy(model_dir: str, conversations: list[list[dict]]) -> list[str]:
    from transformers import AutoModelForCausalLM

    from qwen_tune.models.tokenizer import load_tokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), load_tokenizer(model_dir)
    answers = []
    for conversation in conversations:
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


HELD_OUT_PROMPTS = [[{"role": "user", "content": t.format(c)}] for t in HELD_OUT for c in COLOURS]


@pytest.fixture(scope="module")
def teachers_answers(teacher) -> list[str]:
    """The teacher's greedy answers to the held-out prompts: one of the six Spanish names each (it learned its task)."""
    answers = greedy(teacher, HELD_OUT_PROMPTS)
    assert sorted(set(answers)) == sorted(COLOURS.values())
    return answers


@pytest.mark.slow
@pytest.mark.xdist_group("distill_teacher")
def test_sft_on_the_same_prompts_without_the_teachers_replies_cannot_answer_like_it(teachers_answers, tmp_path):
    """The control (first, so that the teacher is built in its setup, not in the longer test's): SFT of the same student on the same prompts with the data's own replies (English colour names) gives
    the teacher's answer on no more than 10 % of the held-out prompts: what the distilled student knows came from the
    teacher."""
    from qwen_tune.methods.sft import main as sft

    train = colour_data(tmp_path / "train.jsonl", TRAINED_ON, lambda c: c.capitalize() + ".")
    sft(["--data_path", train, "--output_dir", str(tmp_path / "sft"), "--max_steps", "30", "--learning_rate", "3e-3",
         "--per_device_train_batch_size", "8", "--model_max_length", "64", "--report_to", "none", "--disable_tqdm", "True"])
    answers = greedy(str(tmp_path / "sft"), HELD_OUT_PROMPTS)
    assert sum(a.endswith(".") for a in answers) >= 0.9 * len(answers), answers  # it learned its data's replies
    assert sum(a == e for a, e in zip(answers, teachers_answers)) <= 0.1 * len(HELD_OUT_PROMPTS), answers


@pytest.mark.slow
@pytest.mark.xdist_group("distill_teacher")
def test_distilled_student_answers_like_the_larger_teacher(teacher, teachers_answers, tmp_path):
    """The embedded model (2 layers) distilled from a 4-layer teacher of the same width with the recipe, whose
    embedded_model: section trains off-policy on the teacher's own sampled replies (--seq_kd, forward KL: Qwen3's first
    distillation stage, the one a student that has never seen the task learns from): after a reload in a fresh process it
    gives the teacher's greedy answer on >= 90 % of held-out prompts (new phrasings)."""
    train = colour_data(tmp_path / "train.jsonl", TRAINED_ON, lambda c: c.capitalize() + ".")
    out = tmp_path / "student"
    proc = subprocess.run(["sh", "recipes/train_distill.sh", "-d", train, "-o", str(out), "--teacher", teacher,
                           "--report_to", "none", "--disable_tqdm", "True"],  # the YAML's embedded_model: 48 steps
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=fresh_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "recipes/train_distill.yaml" in proc.stderr and "48 prompts (48 with a reply kept)" in proc.stderr
    assert json.load(open(out / "train_metrics.json"))["epoch"] == 8  # 6 steps of 8 prompts each
    answers = generate_in_fresh_process(str(out), HELD_OUT_PROMPTS, adapter=False)
    matched = sum(a == e for a, e in zip(answers, teachers_answers))
    assert matched >= 0.9 * len(HELD_OUT_PROMPTS), list(zip(answers, teachers_answers))
