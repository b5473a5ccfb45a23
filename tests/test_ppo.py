"""qwen-tune ppo end to end on the embedded model.

The setup the issue asks for: an SFT policy that answers one prompt with answer A half of the
time and B the other half; PPO against a reward model (and, separately, a rule-based
--reward_fn) that prefers A must make the policy pick A >= 90% of the time, with bounded KL,
and the saved policy must reload in a fresh offline process and say A.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch
from helpers import ROOT, assert_qwen_tune_card, free_port, fresh_env, generate_in_fresh_process, run_cli, train_tiny_reward_model
from helpers import sample_in_fresh_process as sample_replies

# one worker: the module's trained fixtures are built once, not on each worker that runs one of its tests
pytestmark = pytest.mark.xdist_group("ppo")

PROMPT = [{"role": "user", "content": "Cats or dogs?"}]
PREFERRED, OTHER = "I prefer cats.", "I prefer dogs."


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def share(replies: list[str], answer: str) -> float:
    return sum(r.strip() == answer for r in replies) / len(replies)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("ppo")


@pytest.fixture(scope="module")
def prompts(workdir) -> str:
    return write_jsonl(workdir / "prompts.jsonl", [{"id": f"p{i}", "messages": PROMPT} for i in range(8)])


@pytest.fixture(scope="module")
def sft_policy(workdir) -> str:
    """Full SFT on 8 samples of the same prompt: 4 answered A, 4 answered B."""
    rows = [{"id": f"s{i}", "messages": PROMPT + [{"role": "assistant", "content": PREFERRED if i % 2 else OTHER}]} for i in range(8)]
    out = str(workdir / "sft")
    run_cli("sft", "--data_path", write_jsonl(workdir / "sft.jsonl", rows), "--output_dir", out, "--learning_rate", "1e-2",
            "--num_train_epochs", "30", "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no")
    return out


@pytest.fixture(scope="module")
def reward_model(workdir, base_model_path, tokenizer) -> str:
    """A tiny Bradley-Terry reward model that prefers A over B."""
    return train_tiny_reward_model(base_model_path, tokenizer, PROMPT, PREFERRED, [OTHER], str(workdir / "rm"))


def ppo_log(out: str) -> list[dict]:
    with open(os.path.join(out, "ppo_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def picks_preferred(replies: list[str]) -> float:
    """Share of replies that choose the preferred answer (cats, not dogs)."""
    return sum("cats" in r and "dogs" not in r for r in replies) / len(replies)


REWARD_FN = '''
def prefers_cats(prompt_messages, response_text):
    assert prompt_messages[-1]["role"] == "user"
    return ("cats" in response_text) - ("dogs" in response_text) + 0.0
'''


@pytest.mark.slow
def test_sft_policy_is_undecided(sft_policy):
    replies = sample_replies(PROMPT, sft_policy, 40)
    assert 0.2 <= share(replies, PREFERRED) <= 0.8, replies
    assert 0.2 <= share(replies, OTHER) <= 0.8, replies


def check_trained(out: str, adapter: bool = False) -> list[dict]:
    assert_qwen_tune_card(out)
    rows = ppo_log(out)
    for key in ("step", "reward_mean", "kl", "entropy", "policy_loss", "value_loss", "response_len_mean"):
        assert all(key in r for r in rows), key
    kls = [r["kl"] for r in rows]  # nats per reply; a diverging policy runs off to tens or hundreds
    assert sum(kls) / len(kls) < 5.0 and max(kls) < 20.0, kls  # one odd sample can spike a single step
    replies = sample_replies(PROMPT, out, 40, adapter=adapter)
    assert picks_preferred(replies) >= 0.9, replies
    # the reward model (and rule) score "I prefer cats" and "I prefer cats." alike, so PPO may drop the period
    assert picks_preferred(generate_in_fresh_process(out, [PROMPT], adapter=adapter)) == 1.0
    return rows


@pytest.mark.slow
def test_ppo_recipe_against_a_reward_model_learns_and_the_reload_answers_as_rewarded(sft_policy, reward_model, prompts, workdir):
    """sh recipes/train_ppo.sh -m SFT_OUT -r RM_OUT -d PROMPTS -o OUT, as the README shows it (its YAML, its embedded_model
    section), printing the command it runs."""
    out = str(workdir / "ppo_rm")
    proc = subprocess.run(["sh", "recipes/train_ppo.sh", "-m", sft_policy, "-r", reward_model, "-d", prompts, "-o", out,
                           "--num_train_epochs", "16"],
                          cwd=ROOT, env=fresh_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"+ python -m qwen_tune ppo --config {ROOT}/recipes/train_ppo.yaml --policy {sft_policy} --reward_model" in proc.stderr
    assert "ppo step 16/16" in proc.stderr
    rows = check_trained(out)
    assert rows[-1]["reward_mean"] > rows[0]["reward_mean"]
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json", "value_head.safetensors"):
        assert os.path.exists(os.path.join(out, name)), name


BATCH_REWARD = '''
def names_the_answer(prompts, completions, answer, **kwargs):
    """TRL's convention (as grpo): a batch, with the prompts file's `answer` column; exactly the answer earns 1."""
    return [1.0 if c[0]["content"].strip() == f"I prefer {a}." else 0.0 for c, a in zip(completions, answer)]
'''


@pytest.mark.slow
def test_ppo_with_default_settings_rises_and_stays_without_collapse(sft_policy, tmp_path):
    """Issue 16's run: with the defaults, the reward rose to 1 by step 5 and then collapsed (the policy said "I cats"
    when every reward was equal and the critic's errors were whitened into advantages). The reward is a function in
    TRL's convention (a batch, reading the prompts file's `answer` column), as grpo takes it; `--reward_fn`, one reply
    at a time, drives the DeepSpeed and kill-resume runs below."""
    reward_py = tmp_path / "batch_reward.py"
    reward_py.write_text(BATCH_REWARD)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "messages": PROMPT, "answer": "cats"} for i in range(8)])
    out = str(tmp_path / "out")
    proc = run_cli("ppo", "--policy", sft_policy, "--reward_funcs", f"{reward_py}:names_the_answer", "--prompts", prompts,
                   "--output_dir", out, "--num_train_epochs", "40", "--save_steps", "0")
    assert f"reward from {reward_py}:names_the_answer" in proc.stderr
    rows = ppo_log(out)
    rewards, kls = [r["reward_mean"] for r in rows], [r["kl"] for r in rows]
    first = next(i for i, r in enumerate(rewards) if r == 1.0)
    assert first < 10 and min(rewards[first:]) >= 0.75, rewards  # rises, then stays (no step below 6 of 8)
    assert max(kls) < 20.0, kls
    assert any(r["updates"] == 0 for r in rows[first:])  # batches with no reward spread trained nothing


@pytest.mark.slow
def test_lora_ppo_saves_an_adapter_that_reloads(sft_policy, reward_model, prompts, workdir):
    """One short LoRA step: the reference is the adapter switched off; the output is a PEFT adapter."""
    out = str(workdir / "ppo_lora")
    run_cli("ppo", "--policy", sft_policy, "--reward_model", reward_model, "--prompts", prompts, "--output_dir", out,
            "--num_train_epochs", "1", "--per_device_train_batch_size", "4", "--max_new_tokens", "8", "--use_lora", "True")
    assert os.path.exists(os.path.join(out, "adapter_config.json"))
    assert_qwen_tune_card(out)  # PEFT's save writes its placeholder README.md
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == os.path.abspath(sft_policy)
    assert abs(ppo_log(out)[0]["kl"]) < 1e-4  # first rollout: the actor is still the reference
    from safetensors.torch import load_file

    lora_b = [t for name, t in load_file(os.path.join(out, "adapter_model.safetensors")).items() if "lora_B" in name]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: the step trained the adapter
    [reply] = generate_in_fresh_process(out, [PROMPT], adapter=True)
    assert reply.strip().rstrip(".") in (PREFERRED.rstrip("."), OTHER.rstrip("."))  # still the SFT policy's answers


def ppo_on_two_ranks(config: str, *args: str) -> subprocess.CompletedProcess:
    cmd = ["python", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           "-m", "qwen_tune", "ppo", *args, "--deepspeed", os.path.join(ROOT, "recipes", config)]
    proc = subprocess.run(cmd, cwd=ROOT, env=fresh_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_ppo_under_deepspeed_resumes_from_its_checkpoint_to_the_same_weights(sft_policy, prompts, tmp_path):
    """ZeRO-3 on 2 ranks: each rank holds half the weights, generation runs on sharded weights, the save is gathered
    complete and generates; a run resumed from its step-2 checkpoint (DeepSpeed's weights + optimizer shards, each
    rank's RNG, the KL coefficient and log) ends with the same weights and log as the uninterrupted run (ZeRO-2's
    checkpoint is the same DeepSpeed save / load with fewer shards)."""
    config = "ds_config_zero3.json"
    from safetensors.torch import load_file

    from qwen_tune.train.checkpoints import COMPLETE

    reward_py = tmp_path / "reward.py"
    reward_py.write_text(REWARD_FN)
    ppo = ["--policy", sft_policy, "--reward_fn", f"{reward_py}:prefers_cats", "--prompts", prompts, "--num_train_epochs", "2",
           "--per_device_train_batch_size", "2", "--max_new_tokens", "8", "--ppo_epochs", "2", "--adaptive_kl", "True",
           "--save_steps", "2", "--save_total_limit", "3"]
    reference, resumed = str(tmp_path / "reference"), str(tmp_path / "resumed")
    proc = ppo_on_two_ranks(config, *ppo, "--output_dir", reference, "--keep_checkpoints", "True")
    # searched anywhere: the two ranks share one stderr, so a line may follow another rank's partial line
    shards = re.findall(r"ZeRO-3: rank (\d) holds ([\d,]+) of ([\d,]+) parameter values", proc.stderr)
    assert sorted(shards) == [("0", "4,908,320", "9,816,640"), ("1", "4,908,320", "9,816,640")], shards
    assert [r["rollouts"] for r in ppo_log(reference)] == [4, 4, 4, 4]  # 2 from each rank, scored together
    trained, start = load_file(os.path.join(reference, "model.safetensors")), load_file(os.path.join(sft_policy, "model.safetensors"))
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in start.items()}  # complete, not shards
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    [reply] = generate_in_fresh_process(reference, [PROMPT], adapter=False)
    assert reply.strip().rstrip(".") in (PREFERRED.rstrip("."), OTHER.rstrip("."))  # a gathered, working policy
    checkpoint = os.path.join(reference, "checkpoint-2")
    assert os.path.isfile(os.path.join(checkpoint, COMPLETE)) and os.path.isdir(os.path.join(checkpoint, "deepspeed"))
    assert sorted(f for f in os.listdir(checkpoint) if f.startswith("rng_rank")) == ["rng_rank0.safetensors", "rng_rank1.safetensors"]
    proc = ppo_on_two_ranks(config, *ppo, "--output_dir", resumed, "--resume_from_checkpoint", checkpoint)
    assert f"resumed from {checkpoint} after step 2" in proc.stderr and "ppo step 4/4" in proc.stderr
    assert "ppo step 2/4" not in proc.stderr  # steps 1-2 were not redone
    for name in ("model.safetensors", "value_head.safetensors"):
        want, got = load_file(os.path.join(reference, name)), load_file(os.path.join(resumed, name))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert strip(ppo_log(resumed)) == strip(ppo_log(reference))


@pytest.mark.slow
def test_ppo_killed_then_resumed_matches_an_uninterrupted_run(sft_policy, prompts, workdir, tmp_path):
    """SIGTERM saves and exits; on resume policy, value head, AdamW, KL coefficient, prompt order and RNG come back:
    the same weights and log as an uninterrupted run."""
    from safetensors.torch import load_file

    from qwen_tune.train.checkpoints import COMPLETE, latest_complete_checkpoint

    reward_py = tmp_path / "reward.py"
    reward_py.write_text(REWARD_FN)
    ppo = ["python", "-m", "qwen_tune", "ppo", "--policy", sft_policy, "--reward_fn", f"{reward_py}:prefers_cats",
           "--prompts", prompts, "--num_train_epochs", "3", "--per_device_train_batch_size", "4", "--max_new_tokens", "8",
           "--ppo_epochs", "2", "--adaptive_kl", "True", "--save_steps", "2", "--save_total_limit", "1"]
    reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
    subprocess.run(ppo + ["--output_dir", reference], cwd=ROOT, env=fresh_env(), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(ppo + ["--output_dir", killed], cwd=ROOT, env=fresh_env(), stderr=subprocess.PIPE, text=True)
    while latest_complete_checkpoint(killed) is None:  # step 2 saved: stop it during step 3
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # finishes the step (3, unless the machine is slow), saves it, exits 143
    assert proc.wait(timeout=300) == 143
    stopped = re.search(r"SIGTERM: stopped after step (\d) and saved", proc.stderr.read())
    resumed_from = latest_complete_checkpoint(killed)
    assert stopped and int(stopped.group(1)) < 6 and resumed_from.endswith(f"checkpoint-{stopped.group(1)}")
    assert [d for d in os.listdir(killed) if d.startswith("checkpoint-")] == [os.path.basename(resumed_from)]  # limit 1
    assert os.path.isfile(os.path.join(resumed_from, COMPLETE)) and not os.path.exists(os.path.join(killed, "model.safetensors"))
    res = subprocess.run(ppo + ["--output_dir", killed, "--resume_from_checkpoint", "auto"], cwd=ROOT, env=fresh_env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {resumed_from}" in res.stderr and "ppo step 6/6" in res.stderr
    for name in ("model.safetensors", "value_head.safetensors"):
        want, got = load_file(os.path.join(reference, name)), load_file(os.path.join(killed, name))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert strip(ppo_log(killed)) == strip(ppo_log(reference))
    checkpoint_files = [f for _, _, files in os.walk(killed) for f in files]
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in checkpoint_files)  # no pickles anywhere


def test_bad_options_are_clear_errors(prompts, tmp_path):
    from qwen_tune.errors import UserError
    from qwen_tune.methods.ppo import main

    base = ["--policy", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(UserError, match="give --reward_model DIR, --reward_funcs"):
        main(base + ["--prompts", prompts])
    with pytest.raises(UserError, match="--reward_fn \\(one reply at a time\\) cannot be combined"):
        main(base + ["--prompts", prompts, "--reward_fn", "os:getcwd", "--reward_funcs", "os:getcwd"])
    with pytest.raises(UserError, match="cannot import no_such_module_xyz"):
        main(base + ["--prompts", prompts, "--reward_fn", "no_such_module_xyz:f"])
    with pytest.raises(UserError, match="has no function nope"):
        main(base + ["--prompts", prompts, "--reward_fn", "os:nope"])
    from qwen_tune.methods.ppo import PPOArguments, check_paths

    several_ranks = PPOArguments(policy=str(tmp_path), prompts=prompts, reward_fn="os:getcwd", output_dir=str(tmp_path))
    with pytest.MonkeyPatch.context() as patch:  # as torchrun sets it; without DeepSpeed each rank would train alone
        patch.setenv("WORLD_SIZE", "2")
        with pytest.raises(UserError, match="ppo on several ranks runs under DeepSpeed: add --deepspeed"):
            check_paths(several_ranks)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    with pytest.raises(UserError, match="bad.jsonl:1: .*must end with a user turn"):
        main(base + ["--prompts", str(bad), "--reward_fn", "os:getcwd"])
