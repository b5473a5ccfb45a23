"""Seeing a run: progress line, loss plot (+ its data), TensorBoard events and the model card of a real SFT run."""

from __future__ import annotations

import hashlib
import json
import re
import os

import pytest

from helpers import run_cli

# one worker: the module's trained fixtures are built once, not on each worker that runs one of its tests
pytestmark = pytest.mark.xdist_group("report")

TRAIN = [
    {"id": "w0", "conversations": [{"from": "user", "value": "What is the secret word?"},
                                   {"from": "assistant", "value": "The secret word is pineapple."}]},
    {"id": "w1", "conversations": [{"from": "user", "value": "Name a color."},
                                   {"from": "assistant", "value": "Blue like the sea."}]},
]
STEPS, EVAL_EVERY, SAVE_EVERY = 6, 2, 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    train = d / "train.json"
    train.write_text(json.dumps(TRAIN), encoding="utf-8")
    out = d / "out"
    proc = run_cli("sft", "--data_path", str(train), "--eval_data_path", str(train), "--output_dir", str(out),
                   "--max_steps", str(STEPS), "--learning_rate", "1e-2", "--per_device_train_batch_size", "2",
                   "--eval_strategy", "steps", "--eval_steps", str(EVAL_EVERY), "--save_steps", str(SAVE_EVERY),
                   "--report_to", "tensorboard")
    return out, train, proc


@pytest.mark.slow
def test_progress_shows_eta_loss_lr_and_tokens_per_second(run):
    _, _, proc = run
    assert f"{STEPS}/{STEPS} [" in proc.stderr and "<" in proc.stderr  # tqdm's bar: elapsed<remaining (the ETA)
    lines = [line for line in proc.stdout.splitlines() if "  loss " in line]  # tqdm.write prints logs on stdout
    assert len(lines) >= STEPS
    assert all(re.search(r"learning_rate [\d.e-]+ .*tokens_per_second [\d.]+", line) for line in lines), lines


@pytest.mark.slow
def test_loss_plot_has_train_and_eval_curves(run):
    out, _, _ = run
    png = (out / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    series = json.loads((out / "loss.json").read_text())
    assert [s for s, _ in series["loss"]] == list(range(1, STEPS + 1))
    assert {s for s, _ in series["eval_loss"]} == set(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    assert series["loss"][-1][1] < series["loss"][0][1]  # lr 1e-2 on two samples: the loss falls


@pytest.mark.slow
def test_tensorboard_events_hold_the_train_loss(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = run
    runs = out / "runs"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(runs))
    acc = EventAccumulator(str(runs))
    acc.Reload()
    losses = acc.Scalars("train/loss")
    series = json.loads((out / "loss.json").read_text())["loss"]
    assert [e.step for e in losses] == [s for s, _ in series]
    assert [e.value for e in losses] == pytest.approx([v for _, v in series], rel=1e-5)
    assert len(acc.Scalars("eval/loss")) >= STEPS // EVAL_EVERY


@pytest.mark.slow
def test_model_card_says_what_was_trained_on_what_and_how_to_use_it(run):
    out, train, _ = run
    card = (out / "README.md").read_text()
    digest = hashlib.sha256(train.read_bytes()).hexdigest()
    assert f"| train | `{train.resolve()}` | 2 | `{digest}` |" in card
    assert "qwen-tune-embedded-qwen2" in card  # the base model
    assert "| learning_rate | 0.01 |" in card and f"| max_steps | {STEPS} |" in card
    assert "| warmup_ratio | 0.01 |" in card and "warmup_steps" not in card  # the default --warmup_ratio, named as given
    assert "| train_loss |" in card and "| eval_loss |" in card
    assert f"qwen-tune sft --data_path {train}" in card  # the exact command
    assert "AutoModelForCausalLM.from_pretrained" in card and f"qwen-tune chat --model {out.resolve()}" in card
    assert "![loss](loss.png)" in card


def test_a_users_readme_in_the_output_dir_is_never_overwritten(tmp_path, capsys):
    from qwen_tune.report import write_model_card
    from qwen_tune.train import ownership

    (tmp_path / "README.md").write_text("# my notes\n")
    card = write_model_card(str(tmp_path), model_path="m", kind="sft", adapter=False)
    assert (tmp_path / "README.md").read_text() == "# my notes\n" and card == str(tmp_path / "MODEL_CARD.md")
    assert f"{tmp_path / 'README.md'} was not written by qwen-tune, so it was left as it is" in capsys.readouterr().err
    (tmp_path / "README.md").unlink()
    ownership.claim(str(tmp_path), ["README.md"])  # as a run does before it writes its card
    write_model_card(str(tmp_path), model_path="m", kind="sft", adapter=False)
    assert write_model_card(str(tmp_path), model_path="m2", kind="sft", adapter=False) == str(tmp_path / "README.md")
    assert "base_model: m2" in (tmp_path / "README.md").read_text()  # our own card is replaced by the new run's


def test_plotter_accepts_ppo_log_with_reward_and_kl(tmp_path):
    from qwen_tune.report import plot_losses

    log = tmp_path / "ppo_log.jsonl"
    log.write_text("".join(json.dumps({"step": i, "loss": 1.0 / i, "reward_mean": 0.1 * i, "kl": 0.01 * i}) + "\n"
                           for i in range(1, 6)))
    series = plot_losses(str(log), str(tmp_path / "loss.png"))
    assert set(series) == {"loss", "reward_mean", "kl"}
    assert [v for _, v in series["kl"]] == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05])
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((tmp_path / "loss.json").read_text()) == series
