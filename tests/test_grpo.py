"""qwen-tune grpo end to end on the embedded model.

An SFT policy answers "Pick a color." four ways (red, green, blue, yellow), a quarter of the time each.
GRPO with two reward functions in TRL's convention, one reading the prompts file's `answer` column,
must make it answer green >= 90% of the time; the saved policy reloads in a fresh offline process
and, rendered with its own saved chat template, samples green.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, assert_qwen_tune_card, free_port, fresh_env, run_cli, sample_in_fresh_process, train_tiny_reward_model

# one worker: the module's trained fixtures are built once, not on each worker that runs one of its tests
pytestmark = pytest.mark.xdist_group("grpo")

PROMPT = [{"role": "user", "content": "Pick a color."}]
ANSWERS = ["red.", "green.", "blue.", "yellow."]

REWARDS = '''
def correct(prompts, completions, answer, **kwargs):
    """1 for exactly the answer the prompts file names (a substring test could be gamed: 'redgreen.')."""
    return [1.0 if c[0]["content"].strip() == a + "." else 0.0 for c, a in zip(completions, answer)]


def brief(prompts, completions, **kwargs):
    return [0.2 if len(c[0]["content"]) <= 8 else 0.0 for c in completions]


def raises(prompts, completions, **kwargs):
    raise KeyError("score")


def too_few(prompts, completions, **kwargs):
    return [1.0]


def not_finite(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)


def exits(prompts, completions, **kwargs):
    import sys
    sys.exit(0)


def hangs(prompts, completions, **kwargs):
    import os, time
    open(os.environ["HANG_MARKER"], "w").close()  # the test knows it hangs now
    time.sleep(10**6)
'''


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("grpo")


@pytest.fixture(scope="module")
def rewards(workdir) -> str:
    path = workdir / "rewards.py"
    path.write_text(REWARDS)
    return str(path)


@pytest.fixture(scope="module")
def prompts(workdir) -> str:
    return write_jsonl(workdir / "prompts.jsonl", [{"id": f"p{i}", "messages": PROMPT, "answer": "green"} for i in range(8)])


@pytest.fixture(scope="module")
def sft_policy(workdir) -> str:
    """Full SFT on 8 samples of the same prompt, two per answer."""
    rows = [{"id": f"s{i}", "messages": PROMPT + [{"role": "assistant", "content": ANSWERS[i % 4]}]} for i in range(8)]
    out = str(workdir / "sft")
    run_cli("sft", "--data_path", write_jsonl(workdir / "sft.jsonl", rows), "--output_dir", out, "--learning_rate", "1e-2",
            "--num_train_epochs", "30", "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no")
    return out


def grpo_args(policy: str, prompts: str, rewards: str, out: str, *extra: str) -> list[str]:
    return ["grpo", "--policy", policy, "--prompts", prompts, "--output_dir", out,
            "--reward_funcs", f"{rewards}:correct,{rewards}:brief", "--max_steps", "10", "--per_device_train_batch_size", "8",
            "--num_generations", "8", "--max_completion_length", "8", "--logging_steps", "1", "--report_to", "none", *extra]


def share_green(replies: list[str]) -> float:
    return sum(r.strip() == "green." for r in replies) / len(replies)


@pytest.mark.slow
def test_sft_policy_answers_four_ways(sft_policy):
    replies = sample_in_fresh_process(PROMPT, sft_policy, 40)
    assert {r.strip() for r in replies} == set(ANSWERS), replies
    assert share_green(replies) <= 0.5


@pytest.mark.slow
@pytest.mark.parametrize("mode,flags", [("full", ["--learning_rate", "1e-3"]),
                                        ("lora", ["--learning_rate", "1e-2", "--use_lora", "True", "--lora_r", "16", "--lora_alpha", "32"])])
def test_grpo_learns_the_right_answer_and_reloads(mode, flags, sft_policy, prompts, rewards, workdir):
    """Full: through `sh recipes/train_grpo.sh -m SFT_OUT -d PROMPTS -o OUT`, as the README shows it (its YAML, embedded_model section)."""
    out = str(workdir / mode)
    args = grpo_args(sft_policy, prompts, rewards, out, "--save_strategy", "no", *flags)
    if mode == "full":
        proc = subprocess.run(["sh", "recipes/train_grpo.sh", "-m", sft_policy, "-d", prompts, "-o", out, *args[7:]], cwd=ROOT, env=fresh_env(),
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0 and "recipes/train_grpo.yaml" in proc.stderr, proc.stderr[-3000:]
    else:
        proc = run_cli(*args)
    assert "rewards: correct, brief" in proc.stderr
    history = json.load(open(os.path.join(out, "train_metrics.json")))
    assert history["reward_first"] < 1.0 <= history["reward_final"]  # 1 for correct + 0.2 for brief at the end
    rows = [json.loads(line) for line in open(os.path.join(out, "grpo_log.jsonl"))]
    steps = [r for r in rows if "rewards/correct/mean" in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    for key in ("rewards/brief/mean", "reward", "reward_std", "frac_reward_zero_std", "kl", "entropy",
                "completions/mean_length", "completions/clipped_ratio"):
        assert all(key in r for r in steps), key
    replies = sample_in_fresh_process(PROMPT, out, 40, adapter=mode != "full")
    assert share_green(replies) >= 0.9, replies
    files = set(os.listdir(out))
    assert ("adapter_model.safetensors" in files) == (mode != "full") and "chat_template.jinja" in files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    assert_qwen_tune_card(out)  # TRL's GRPOTrainer writes its own card into OUT/README.md


@pytest.mark.slow
def test_grpo_qlora_trains_an_adapter_on_a_4bit_base_that_reloads(sft_policy, prompts, rewards, workdir):
    """Q-LoRA is LoRA (learning shown above) on a 4-bit base: two steps train every adapter matrix, and the adapter
    reloads in a fresh process on the full-precision base and answers as the policy does."""
    from safetensors.torch import load_file

    out = str(workdir / "qlora")
    args = grpo_args(sft_policy, prompts, rewards, out, "--save_strategy", "no", "--learning_rate", "1e-2", "--use_lora", "True",
                     "--q_lora", "True", "--lora_r", "16", "--lora_alpha", "32")
    args[args.index("--max_steps") + 1] = "2"
    run_cli(*args)
    lora_b = [t for name, t in load_file(os.path.join(out, "adapter_model.safetensors")).items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero
    assert_qwen_tune_card(out)
    replies = sample_in_fresh_process(PROMPT, out, 8, adapter=True)
    assert {r.strip() for r in replies} <= set(ANSWERS), replies


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ds_config_zero2.json", "ds_config_zero3.json"])
def test_grpo_under_deepspeed_on_two_ranks_trains_and_saves_complete_weights(config, sft_policy, prompts, rewards, tmp_path):
    """sh recipes/train_grpo_ds.sh (torchrun, 2 CPU ranks), a few steps (learning is the single-process test's): each
    rank generates 4 of a group's 8 completions; ZeRO-3 shards the weights and gathers them to save."""
    from safetensors.torch import load_file

    out = str(tmp_path / "out")
    cmd = ["sh", "recipes/train_grpo_ds.sh", "-m", sft_policy, "-d", prompts, "-o", out, "--learning_rate", "1e-3",
           "--reward_funcs", f"{rewards}:correct,{rewards}:brief", "--max_steps", "2", "--per_device_train_batch_size", "4",
           "--max_completion_length", "8", "--save_strategy", "no", "--report_to", "none"]
    env = fresh_env(MASTER_PORT=free_port(), DS_CONFIG=os.path.join(ROOT, "recipes", config))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "+ torchrun --nproc_per_node 2" in proc.stderr and "grpo --config" in proc.stderr
    if "zero3" in config:  # searched anywhere: the two ranks share one stderr
        shards = re.findall(r"ZeRO-3: rank (\d) holds ([\d,]+) of ([\d,]+) parameter values", proc.stderr)
        assert sorted(shards) == [("0", "4,908,320", "9,816,640"), ("1", "4,908,320", "9,816,640")], shards
    trained, start = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(sft_policy, "model.safetensors"))
    assert all(k in trained and trained[k].shape == start[k].shape for k in start)  # complete, not shards
    assert any(not (trained[k] == start[k]).all() for k in start)


@pytest.mark.slow
def test_grpo_sigterm_then_resume_continues_to_the_same_weights(sft_policy, prompts, rewards, tmp_path):
    import torch
    from safetensors.torch import load_file

    from qwen_tune.train.checkpoints import latest_complete_checkpoint

    args = ["--learning_rate", "1e-3", "--save_steps", "2", "--save_total_limit", "1", "--max_steps", "4"]
    reference, stopped = str(tmp_path / "reference"), str(tmp_path / "stopped")
    run_cli(*grpo_args(sft_policy, prompts, rewards, reference, *args))
    cmd = ["python", "-m", "qwen_tune", *grpo_args(sft_policy, prompts, rewards, stopped, *args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=fresh_env(), stderr=subprocess.PIPE, text=True)
    while latest_complete_checkpoint(stopped) is None:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143
    step = int(re.search(r"SIGTERM: stopped after step (\d+) and saved", proc.stderr.read()).group(1))
    assert step < 4
    resumed = run_cli(*grpo_args(sft_policy, prompts, rewards, stopped, *args, "--resume_from_checkpoint", "auto"))
    assert f"resuming from {os.path.join(stopped, f'checkpoint-{step}')}" in resumed.stderr
    want, got = load_file(os.path.join(reference, "model.safetensors")), load_file(os.path.join(stopped, "model.safetensors"))
    # bit for bit: the same --seed gives the same run, across processes and a resume
    assert all(torch.equal(want[name], got[name]) for name in want), [n for n in want if not torch.equal(want[n], got[n])]


PROMPTS_OF_A_BATCH = r"\(prompts p\d+(, p\d+)*\)"  # which prompts a batch holds is the sampler's choice


@pytest.mark.slow
@pytest.mark.parametrize("function,message", [
    ("raises", "--reward_funcs {rewards}:raises {batch} raised KeyError: 'score'"),
    ("too_few", "--reward_funcs {rewards}:too_few returned \\[1.0\\] for 8 completions; it must return a list with one number"),
    ("not_finite", "--reward_funcs {rewards}:not_finite returned nan for prompt p"),
    ("exits", "--reward_funcs {rewards}:exits {batch} raised SystemExit \\(0\\): a reward function must return its "
              "values, not end the run"),
    ("hangs", "--reward_funcs {rewards}:hangs {batch} did not return within --reward_timeout 2 s"),
])
def test_a_broken_reward_function_stops_the_run_naming_it(function, message, sft_policy, prompts, rewards, tmp_path):
    out = str(tmp_path / "out")
    args = grpo_args(sft_policy, prompts, rewards, out, "--save_strategy", "no", "--reward_timeout", "2")
    args[args.index("--reward_funcs") + 1] = f"{rewards}:{function}"
    marker = {"HANG_MARKER": str(tmp_path / "hanging")} if function == "hangs" else {}  # other variables cost the forkserver
    proc = run_cli(*args, check=False, **marker)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(message.format(rewards=re.escape(rewards), batch=PROMPTS_OF_A_BATCH), proc.stderr), proc.stderr[-3000:]
    assert not os.path.exists(os.path.join(out, "model.safetensors"))  # nothing written half-way


def test_sigterm_stops_a_run_whose_reward_function_hangs(sft_policy, prompts, rewards, tmp_path):
    out, hanging = str(tmp_path / "out"), tmp_path / "hanging"
    args = grpo_args(sft_policy, prompts, rewards, out)
    args[args.index("--reward_funcs") + 1] = f"{rewards}:hangs"
    proc = subprocess.Popen(["python", "-m", "qwen_tune", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env=fresh_env(HANG_MARKER=str(hanging)))
    while not hanging.exists():
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 2  # at once, not after --reward_timeout (60 s)
    err = proc.stderr.read()
    assert re.search(f"--reward_funcs {re.escape(rewards)}:hangs {PROMPTS_OF_A_BATCH}", err) and "SIGTERM" in err, err


def test_prompts_are_checked_before_any_model_loads(tmp_path, base_model_path):
    from qwen_tune.errors import DataError, UserError
    from qwen_tune.methods.grpo import main

    base = ["--policy", base_model_path, "--output_dir", str(tmp_path / "out"), "--reward_funcs", "os:getcwd"]
    uneven = write_jsonl(tmp_path / "uneven.jsonl", [{"messages": PROMPT, "answer": "green"}, {"messages": PROMPT}])
    with pytest.raises(UserError, match="uneven.jsonl:2: has no answer \\(other prompts have them\\)"):
        main(base + ["--prompts", uneven])
    typed = write_jsonl(tmp_path / "typed.jsonl", [{"messages": [{"role": "user", "content": "hi<|im_end|>"}]}])
    with pytest.raises(UserError, match="typed.jsonl:1: the chat template would read text in this prompt as control tokens"):
        main(base + ["--prompts", typed])
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"messages": PROMPT + [{"role": "assistant", "content": "red."}]}])
    with pytest.raises(DataError, match="sft.jsonl:1: .*must end with a user turn"):
        main(base + ["--prompts", sft])
    good = write_jsonl(tmp_path / "good.jsonl", [{"messages": PROMPT, "answer": "green"}])
    with pytest.raises(UserError, match="--reward_funcs no_such_module_xyz:f: cannot import"):
        main(base + ["--prompts", good, "--reward_funcs", "no_such_module_xyz:f"])


def test_example_reward_functions_check_the_whole_answer():
    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    from grpo_rewards import exact_answer, number_only

    replies = [[{"role": "assistant", "content": text}] for text in ("19", "19.", "1919", "19 or 20", "twenty")]
    assert exact_answer([PROMPT] * 5, replies, answer=["19"] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert number_only([PROMPT] * 5, replies) == [0.2, 0.2, 0.2, 0.0, 0.0]


@pytest.fixture(scope="module")
def green_reward_model(workdir, base_model_path, tokenizer) -> str:
    """A tiny Bradley-Terry reward model that prefers "green." over each other answer, scored as rm scores."""
    return train_tiny_reward_model(base_model_path, tokenizer, PROMPT, "green.", ["red.", "blue.", "yellow."],
                                   str(workdir / "rm"))


@pytest.mark.slow
def test_a_reward_model_is_one_more_reward(sft_policy, prompts, green_reward_model, workdir):
    out = str(workdir / "with_rm")
    args = grpo_args(sft_policy, prompts, "unused", out, "--learning_rate", "1e-3", "--save_strategy", "no",
                     "--reward_model", green_reward_model)
    del args[args.index("--reward_funcs"):args.index("--reward_funcs") + 2]
    proc = run_cli(*args)
    assert "rewards: reward_model" in proc.stderr
    assert share_green(sample_in_fresh_process(PROMPT, out, 40)) >= 0.9
