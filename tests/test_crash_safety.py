"""Crash safety, proven by faults injected into real `qwen-tune sft` processes on the embedded model.

Kills are real signals to real processes. Which samples each step saw is recorded, and a NaN is
injected, by callbacks that `tests/faults.py` hands to the trainer.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch
from helpers import DATA, ROOT, fresh_env, library_noise, save_random_teacher
from safetensors.torch import load_file

from qwen_tune.errors import UserError
from qwen_tune.train import ownership
from qwen_tune.train.checkpoints import COMPLETE, latest_complete_checkpoint, rotate_checkpoints
from qwen_tune.train.guards import check_free_space
from qwen_tune.train.output_dir import prepare_output_dir

MAX_STEPS, SAVE_STEPS = 8, 2  # 12 samples, batch 2: 6 steps per epoch, so resuming also crosses an epoch
TRAIN = ["sft", "--data_path", os.path.join(DATA, "sft_example.json"), "--max_steps", str(MAX_STEPS),
         "--save_steps", str(SAVE_STEPS), "--save_total_limit", "2", "--per_device_train_batch_size", "2",
         "--model_max_length", "64", "--learning_rate", "1e-3", "--report_to", "none", "--disable_tqdm", "True"]


FAULTS = os.path.join(ROOT, "tests", "faults.py")


def start(out: str, trace: str, *extra: str, nan_at_step: int | None = None, command: list[str] = TRAIN) -> subprocess.Popen:
    """A run in a fresh process (the forkserver's: a test that kills a run kills the training process itself, whose
    pid the trace names, and the client then dies of the same signal)."""
    log = open(out + ".log", "a")
    faults = (["--trace", trace] if trace else []) + (["--nan_at_step", str(nan_at_step)] if nan_at_step else [])
    if extra[:1] == ("--kill_in_final_save",):
        faults, extra = faults + list(extra[:2]), extra[2:]
    return subprocess.Popen(["python", FAULTS, *faults, *command, "--output_dir", out, *extra], cwd=ROOT,
                            env=fresh_env(), stdout=log, stderr=subprocess.STDOUT)


def sigkill(proc: subprocess.Popen, trace: str) -> None:
    """SIGKILL the training process (the last traced step's), as the OOM killer or a preempted node would."""
    with open(trace) as f:
        pid = json.loads(f.readlines()[-1])["pid"]
    os.kill(pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def finish(proc: subprocess.Popen, out: str) -> tuple[int, str]:
    rc = proc.wait(timeout=600)
    with open(out + ".log") as f:
        return rc, f.read()


def traced_steps(trace: str) -> dict[int, list[str]]:
    steps = {}
    if os.path.exists(trace):
        with open(trace) as f:
            for line in f:
                if line.endswith("\n"):
                    record = json.loads(line)
                    steps[record["step"]] = record["ids"]
    return steps


def wait_until_step(proc: subprocess.Popen, trace: str, step: int, out: str) -> None:
    """Poll until the run has started `step` (and saved its first checkpoint)."""
    while not (max(traced_steps(trace), default=0) >= step and latest_complete_checkpoint(out)):
        assert proc.poll() is None, f"run ended early:\n{finish(proc, out)[1]}"
        time.sleep(0.05)


def weights(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its final weights and the sample ids of each step."""
    tmp = tmp_path_factory.mktemp("reference")
    out, trace = str(tmp / "out"), str(tmp / "trace.jsonl")
    rc, log = finish(start(out, trace, "--keep_checkpoints", "True"), out)
    assert rc == 0, log
    return {"out": out, "steps": traced_steps(trace), "weights": weights(out)}


@pytest.mark.slow
def test_uninterrupted_run_keeps_only_complete_checkpoints_and_no_pickles(reference):
    out = reference["out"]
    assert sorted(reference["steps"]) == list(range(1, MAX_STEPS + 1))
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-6", "checkpoint-8"]
    assert all(os.path.isfile(os.path.join(out, d, COMPLETE)) for d in ("checkpoint-6", "checkpoint-8"))
    assert [f for _, _, files in os.walk(out) for f in files if f == "training_args.bin"] == []
    saved_args = json.load(open(os.path.join(out, "training_args.json")))
    assert saved_args["max_steps"] == MAX_STEPS and saved_args["save_total_limit"] == 2  # as given, though we rotate


@pytest.mark.slow
def test_sigkill_then_resume_auto_matches_uninterrupted_run(reference, tmp_path):
    out, trace1, trace2 = str(tmp_path / "out"), str(tmp_path / "t1.jsonl"), str(tmp_path / "t2.jsonl")
    kill_at = random.randint(SAVE_STEPS + 1, MAX_STEPS - 1)
    proc = start(out, trace1)
    wait_until_step(proc, trace1, kill_at, out)
    sigkill(proc, trace1)
    resumed_from = latest_complete_checkpoint(out)
    step = int(resumed_from.rsplit("-", 1)[1])
    # What a kill while writing a checkpoint leaves: a newer checkpoint without the completion marker.
    # It may not be resumed, and must not stay (the resumed run would write into it).
    half = os.path.join(out, "checkpoint-98")
    ownership.claim(out, ["checkpoint-98"])  # the run claims a checkpoint before it writes it
    shutil.copytree(resumed_from, half)
    os.remove(os.path.join(half, COMPLETE))
    with open(os.path.join(half, "model.safetensors"), "r+b") as f:
        f.truncate(1000)

    rc, log = finish(start(out, trace2, "--resume_from_checkpoint", "auto"), out)
    assert rc == 0, log
    assert f"resuming from {resumed_from}" in log and f"ignoring and removing {half}" in log
    assert not library_noise(log), library_noise(log)  # tied embeddings: no "missing keys ['lm_head.weight']"
    assert not os.path.exists(half)
    first, second = traced_steps(trace1), traced_steps(trace2)
    assert min(second) == step + 1, f"killed at step {kill_at}, resumed from {step}"
    seen = {s: ids for s, ids in first.items() if s <= step} | second
    assert seen == reference["steps"], f"killed at step {kill_at}"
    assert_same_weights(weights(out), reference["weights"])
    # finished: the checkpoints are removed (the reference run kept them with --keep_checkpoints True)
    assert [d for d in os.listdir(out) if d.startswith("checkpoint-")] == [] and "removed the run's 2 checkpoint directories" in log


def session_runtime(log: str, step: int) -> float:
    """The `train_runtime` (this process's training time so far) on the progress line of `step`."""
    return float(re.findall(rf"step {step}/{MAX_STEPS}  loss .*?train_runtime ([\d.e+-]+)", log)[-1])


@pytest.mark.slow
def test_sigterm_saves_exits_143_and_resume_continues_exactly(reference, tmp_path):
    out, trace1, trace2 = str(tmp_path / "out"), str(tmp_path / "t1.jsonl"), str(tmp_path / "t2.jsonl")
    with_bar = ("--disable_tqdm", "False")  # the progress bar a user sees, which messages must not be glued to
    proc = start(out, trace1, *with_bar)
    wait_until_step(proc, trace1, SAVE_STEPS + 1, out)
    proc.send_signal(signal.SIGTERM)
    rc, log = finish(proc, out)
    assert rc == 143, log
    stopped = max(traced_steps(trace1))
    # each message starts a line as a terminal shows it (after a newline, or the carriage return that clears the bar)
    assert re.search(r"(^|[\r\n])received SIGTERM", log) and re.search(rf"[\r\n]SIGTERM: stopped after step {stopped} and saved", log), log
    assert "Traceback" not in log
    assert os.path.isfile(os.path.join(out, f"checkpoint-{stopped}", COMPLETE))
    assert not os.path.exists(os.path.join(out, "model.safetensors"))  # not mistaken for a finished run
    first_segment = session_runtime(log, stopped)

    rc, log = finish(start(out, trace2, "--resume_from_checkpoint", "auto", *with_bar), out)
    assert rc == 0, log
    assert min(traced_steps(trace2)) == stopped + 1
    assert {s: ids for s, ids in traced_steps(trace1).items()} | traced_steps(trace2) == reference["steps"]
    assert_same_weights(weights(out), reference["weights"])
    # the metrics and the card describe the whole run, not its last segment: the loss averaged over every step
    # (each one logged in loss.json), the training time of both segments
    metrics = json.load(open(os.path.join(out, "train_metrics.json")))
    losses = dict(json.load(open(os.path.join(out, "loss.json")))["loss"])
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert metrics["train_loss"] == pytest.approx(sum(losses.values()) / MAX_STEPS, rel=1e-5)
    assert metrics["train_runtime"] >= first_segment + session_runtime(log, MAX_STEPS) - 0.01
    assert metrics["train_steps_per_second"] == pytest.approx(MAX_STEPS / metrics["train_runtime"], rel=0.01)
    card = open(os.path.join(out, "README.md")).read()
    assert f"| train_loss | {metrics['train_loss']:.4g} |" in card and f"| train_runtime | {metrics['train_runtime']:.4g} |" in card


@pytest.mark.slow
def test_nan_stops_naming_step_and_samples_and_keeps_last_checkpoint(tmp_path):
    out, trace = str(tmp_path / "out"), str(tmp_path / "t.jsonl")
    rc, log = finish(start(out, trace, nan_at_step=3), out)
    assert rc == 2, log
    assert "Traceback" not in log
    ids = traced_steps(trace)[3]
    assert f"step 3: non-finite loss nan on samples {', '.join(ids)}" in log, log
    assert latest_complete_checkpoint(out) == os.path.join(out, "checkpoint-2")
    # no later checkpoint and no final model (the loss curve written at each save may stay)
    assert [f for f in os.listdir(out) if f.startswith("checkpoint-")] == ["checkpoint-2"]
    assert not any(f.endswith(".safetensors") for f in os.listdir(out))
    assert all(torch.isfinite(t).all() for t in weights(os.path.join(out, "checkpoint-2")).values())


@pytest.mark.slow
def test_max_bad_steps_skips_the_step_without_touching_weights(tmp_path):
    out, trace = str(tmp_path / "out"), str(tmp_path / "t.jsonl")
    rc, log = finish(start(out, trace, "--max_steps", "3", "--max_bad_steps", "1", "--keep_checkpoints", "True", nan_at_step=3), out)
    assert rc == 0, log
    assert "step 3: non-finite loss nan" in log and "skipping this step (1 of --max_bad_steps 1)" in log
    # step 3 was skipped, so the final weights are exactly those after step 2
    assert_same_weights(weights(out), weights(os.path.join(out, "checkpoint-2")))


PAIRS = ["--data_path", os.path.join(DATA, "preference_example.json"), "--max_steps", "6", "--save_steps", "2",
         "--save_total_limit", "1", "--per_device_train_batch_size", "2", "--model_max_length", "128",
         "--learning_rate", "1e-3", "--report_to", "none", "--disable_tqdm", "True"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rm", "dpo", "orpo", "simpo", "kto", "distill"])
def test_preference_and_distillation_trainers_resume_after_sigkill_to_the_same_weights(method, tmp_path):
    """rm, dpo, orpo, simpo, kto (unpaired replies) and distill (replies the student samples) get sft's safety from the
    same callbacks: marked checkpoints, exact resume, no pickles."""
    data = {"kto": os.path.join(DATA, "kto_example.jsonl"),  # kto reads replies labelled true or false
            "distill": os.path.join(DATA, "distill_example.jsonl")}.get(method)  # distill: prompts
    command = [method, *PAIRS] if data is None else [method, *PAIRS[2:], "--data_path", data]
    if method == "distill":  # the student samples its replies: a resumed run must draw the same ones
        command += ["--teacher", save_random_teacher(tmp_path / "teacher"), "--max_new_tokens", "4"]
    reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
    rc, log = finish(start(reference, str(tmp_path / "r.jsonl"), command=command), reference)
    assert rc == 0, log
    proc = start(killed, str(tmp_path / "k1.jsonl"), command=command)
    wait_until_step(proc, str(tmp_path / "k1.jsonl"), 4, killed)
    sigkill(proc, str(tmp_path / "k1.jsonl"))
    resumed_from = latest_complete_checkpoint(killed)
    rc, log = finish(start(killed, str(tmp_path / "k2.jsonl"), "--resume_from_checkpoint", "auto", "--keep_checkpoints", "True",
                           command=command), killed)
    assert rc == 0, log
    assert f"resuming from {resumed_from}" in log
    assert min(traced_steps(str(tmp_path / "k2.jsonl"))) == int(resumed_from.rsplit("-", 1)[1]) + 1
    assert_same_weights(weights(killed), weights(reference))
    assert [d for d in os.listdir(killed) if d.startswith("checkpoint-")] == ["checkpoint-6"]  # limit 1, complete
    assert os.path.isfile(os.path.join(killed, "checkpoint-6", COMPLETE))
    assert [f for _, _, files in os.walk(killed) for f in files if f.endswith((".bin", ".pkl"))] == []
    if method == "rm":  # TRL's token counter is not in its checkpoint: the resumed run continues it from the log
        with open(os.path.join(killed, "checkpoint-6", "trainer_state.json")) as f:
            counted = [h["num_tokens"] for h in json.load(f)["log_history"] if "num_tokens" in h]
        assert len(counted) == 6 and counted == sorted(counted) and len(set(counted)) == 6, counted


def test_unwritable_output_dir_fails_before_training(tmp_path, capsys):
    from qwen_tune.methods import sft

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode == 0
    try:
        try:
            (locked / "probe").touch()
            pytest.skip("cannot make a read-only directory here (root without chattr)")
        except OSError:
            pass
        with pytest.raises(UserError, match=f"--output_dir {locked}/out is not writable"):
            sft.main([*TRAIN[1:], "--output_dir", str(locked / "out")])
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(locked)])
        locked.chmod(0o755)
    assert "train:" not in capsys.readouterr().err  # failed before the data was even read


def prepare(out, overwrite: bool = False, resume: str | None = None) -> str | None:
    """The output directory step of prepare_run: the checkpoint to resume from, or None."""
    return prepare_output_dir(str(out), overwrite, resume)


def make_checkpoint(out, step: int, complete: bool = True) -> str:
    """A checkpoint as a qwen-tune run leaves it: claimed in the directory's owner record, then written."""
    path = os.path.join(out, f"checkpoint-{step}")
    ownership.claim(str(out), [f"checkpoint-{step}"])
    os.makedirs(path)
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        f.write("{}")
    if complete:
        open(os.path.join(path, COMPLETE), "w").close()
    return path


def test_finished_or_interrupted_run_is_not_overwritten_without_the_flag(tmp_path):
    finished = tmp_path / "finished"
    ownership.claim(str(finished), ["model.safetensors", ownership.RUN_COMPLETE])
    (finished / "model.safetensors").write_bytes(b"x")
    ownership.mark_finished(str(finished), {})
    with pytest.raises(UserError, match="holds a finished run.*--overwrite_output_dir"):
        prepare(finished)
    make_checkpoint(finished, 8)  # the last checkpoint of that run
    with pytest.raises(UserError, match="finished run \\(run_complete.json\\): there is nothing to resume, and nothing was changed"):
        prepare(finished, resume="auto")
    assert sorted(os.listdir(finished)) == [".qwen-tune", "checkpoint-8", "model.safetensors", "run_complete.json"]
    interrupted = tmp_path / "interrupted"
    make_checkpoint(interrupted, 4)
    with pytest.raises(UserError, match="checkpoints of an interrupted run.*--resume_from_checkpoint auto"):
        prepare(interrupted)
    assert prepare(interrupted, resume="auto") == os.path.join(interrupted, "checkpoint-4")  # resuming is allowed
    prepare(finished, overwrite=True)
    assert not (finished / "model.safetensors").exists()


def test_resume_auto_skips_incomplete_checkpoints_and_starts_fresh_when_none(tmp_path, capsys):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4)
    make_checkpoint(tmp_path, 6, complete=False)  # killed while writing
    assert prepare(tmp_path, resume="auto") == os.path.join(tmp_path, "checkpoint-4")
    assert prepare(tmp_path / "empty", resume="auto") is None and "starting fresh" in capsys.readouterr().err
    with pytest.raises(UserError, match="not a checkpoint directory"):
        prepare(tmp_path / "x", resume=str(tmp_path / "nowhere"))


def test_rotation_never_deletes_the_kept_newest_or_incomplete_checkpoints(tmp_path):
    for step in (2, 4, 6):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 9, complete=False)
    newest = os.path.join(tmp_path, "checkpoint-6")
    rotate_checkpoints(str(tmp_path), 1, keep={newest})
    assert sorted(os.listdir(tmp_path)) == [".qwen-tune", "checkpoint-6", "checkpoint-9"]
    assert ownership.ours(str(tmp_path)) == {"checkpoint-6", "checkpoint-9"}  # what was removed is no longer claimed


def test_too_little_disk_space_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="GB free, but a checkpoint needs about"):
        check_free_space(str(tmp_path), 10**18)
    check_free_space(str(tmp_path), 1)


def test_pickle_only_model_dir_needs_allow_pickle_weights(tmp_path):
    from qwen_tune.models.model import load_model
    from qwen_tune.trust import check_weights_format

    (tmp_path / "config.json").write_text("{}")
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="only pickle weights \\(pytorch_model.bin\\).*--allow_pickle_weights"):
        load_model(str(tmp_path))
    check_weights_format(str(tmp_path), allow_pickle=True)


class _Planted:
    """Unpickling this runs `touch MARKER` (what a planted file in a downloaded checkpoint could do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("planted_file", ["rng_state.pth", "optimizer.pt"])
def test_a_planted_pickle_in_a_checkpoint_is_refused_before_resuming(planted_file, reference, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "marker"
    ownership.claim(str(out), ["checkpoint-8"])  # as the run that wrote it did
    shutil.copytree(os.path.join(reference["out"], "checkpoint-8"), out / "checkpoint-8")
    torch.save(_Planted(str(marker)), out / "checkpoint-8" / planted_file)
    rc, log = finish(start(str(out), str(tmp_path / "trace.jsonl"), "--resume_from_checkpoint", "auto"), str(out))
    assert rc == 2 and f"checkpoint-8/{planted_file} holds a pickle that would run posix.system" in log, log
    assert "Traceback" not in log and not marker.exists()


FINAL_SAVE_RUNS = {  # each method, two steps with a checkpoint at the last one, on the embedded model
    "sft": TRAIN[:1] + ["--data_path", os.path.join(DATA, "sft_example.json"), "--max_steps", "2", "--save_steps", "2",
                        "--per_device_train_batch_size", "2", "--model_max_length", "64", "--report_to", "none"],
    "rm": ["rm", *PAIRS[:2], "--max_steps", "2", "--save_steps", "2", "--per_device_train_batch_size", "2",
           "--model_max_length", "128", "--report_to", "none"],
    "dpo": ["dpo", *PAIRS[:2], "--max_steps", "2", "--save_steps", "2", "--per_device_train_batch_size", "2",
            "--model_max_length", "128", "--report_to", "none"],
    "grpo": ["grpo", "--prompts", os.path.join(DATA, "grpo_example.jsonl"), "--reward_funcs",
             os.path.join(ROOT, "recipes", "grpo_rewards.py") + ":number_only", "--max_steps", "2", "--save_steps", "2",
             "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "8",
             "--report_to", "none"],
    "ppo": ["ppo", "--prompts", os.path.join(DATA, "prompts_example.jsonl"), "--reward_funcs",  # 8 prompts: 2 steps
            os.path.join(ROOT, "recipes", "grpo_rewards.py") + ":number_only", "--save_steps", "2",
            "--per_device_train_batch_size", "4", "--max_new_tokens", "4"],
}


@pytest.mark.parametrize("method", list(FINAL_SAVE_RUNS))
def test_a_kill_in_the_final_save_is_not_a_finished_run_and_resumes_to_the_uninterrupted_weights(method, tmp_path,
                                                                                                    base_model_path):
    """Killed with half of its final files moved in: no run_complete.json, so nothing loads it and resume does not
    refuse it; the resumed run ends with the weights of a run that was never killed: those the killed one had
    finished training and was publishing (written whole to its staging folder, half of them moved in)."""
    from qwen_tune.tools.chat import main as chat

    command = FINAL_SAVE_RUNS[method] + (["--policy", base_model_path] if method in ("grpo", "ppo") else [])
    killed = str(tmp_path / "killed")
    trace = None if method == "ppo" else str(tmp_path / "trace.jsonl")  # ppo is not a Trainer: no callbacks
    proc = start(killed, trace, "--kill_in_final_save", "half", command=command)
    assert proc.wait(timeout=600) == -signal.SIGKILL, finish(proc, killed)[1]
    assert not os.path.exists(os.path.join(killed, "run_complete.json"))
    staged = os.path.join(killed, ".qwen-tune", "final")
    uninterrupted = weights(killed if os.path.exists(os.path.join(killed, "model.safetensors")) else staged)
    with pytest.raises(UserError, match="is a qwen-tune run that did not finish .*--resume_from_checkpoint auto"):
        chat(["--model", killed, "--prompt", "hi"])
    rc, log = finish(start(killed, trace, "--resume_from_checkpoint", "auto", command=command), killed)
    assert rc == 0 and os.path.isfile(os.path.join(killed, "run_complete.json")), log
    assert f"resuming from {os.path.join(killed, 'checkpoint-2')}" in log, log  # not trained again
    assert_same_weights(weights(killed), uninterrupted)
    assert not os.path.exists(staged)  # nothing staged is left
