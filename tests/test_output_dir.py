"""qwen-tune removes and replaces only what it wrote, and one run at a time writes an output directory.

Real runs on the embedded model, in fresh processes; the user's files are plain files the test writes.
"""

import json
import os
import signal
import subprocess
import time

import pytest


from helpers import DATA, REAL_INTERPRETER, ROOT, fresh_env

FAULTS = os.path.join(ROOT, "tests", "faults.py")  # qwen-tune with test callbacks (--hold_while)
RUN = ["sft", "--data_path", os.path.join(DATA, "sft_example.json"), "--per_device_train_batch_size", "2",
       "--model_max_length", "64", "--report_to", "none", "--disable_tqdm", "True"]


def run(out, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["python", "-m", "qwen_tune", *RUN, "--max_steps", "2", "--output_dir", str(out), *extra], cwd=ROOT,
                          env=fresh_env(), capture_output=True, text=True, timeout=600)


def users_files(out) -> dict[str, str]:
    """The user's files in `out` (written by `plant`), with their contents."""
    return {os.path.relpath(os.path.join(root, name), out): open(os.path.join(root, name)).read()
            for root, _, names in os.walk(out) for name in names if name.startswith("notes")}


def plant(out, *names: str) -> dict[str, str]:
    for name in names:
        os.makedirs(os.path.dirname(os.path.join(out, name)) or out, exist_ok=True)
        with open(os.path.join(out, name), "w") as f:
            f.write(f"the user's {name}")
    return users_files(out)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_a_directory_with_the_users_files_is_refused_and_with_the_flag_they_survive_every_run(tmp_path):
    out = tmp_path / "out"
    before = plant(out, "notes.txt", "notes/more.txt")
    line = one_error_line(run(out))
    assert "holds files qwen-tune did not write (notes, notes.txt)" in line and "--overwrite_output_dir True" in line
    assert sorted(os.listdir(out)) == ["notes", "notes.txt"]  # not even a lock file was written
    proc = run(out, "--overwrite_output_dir", "True")
    assert proc.returncode == 0 and os.path.isfile(out / "run_complete.json"), proc.stderr
    proc = run(out, "--overwrite_output_dir", "True")  # a second run replaces the first one's files, and only those
    assert proc.returncode == 0 and "removing the earlier run's" in proc.stderr and "notes" not in proc.stderr.split(
        "removing the earlier run's")[1].splitlines()[0], proc.stderr
    assert users_files(out) == before


def test_a_users_checkpoint_folder_is_never_removed_resumed_or_replaced(tmp_path):
    """A `checkpoint-7/notes.txt` of the user's: refused even with --overwrite_output_dir (a run writes checkpoint-N),
    and in a qwen-tune directory `--resume_from_checkpoint auto` neither resumes from it nor deletes it."""
    out = tmp_path / "out"
    before = plant(out, "checkpoint-7/notes.txt")
    for extra in ((), ("--overwrite_output_dir", "True"), ("--resume_from_checkpoint", "auto")):
        line = one_error_line(run(out, *extra))
        assert "checkpoint-7" in line and ("did not write" in line), line
    assert users_files(out) == before
    interrupted = tmp_path / "interrupted"  # a qwen-tune run killed after its first checkpoint, then the user's folder
    proc = run(interrupted, "--save_steps", "1", "--keep_checkpoints", "True")
    assert proc.returncode == 0, proc.stderr
    os.remove(interrupted / "run_complete.json")
    before = plant(interrupted, "checkpoint-7/notes.txt")
    line = one_error_line(run(interrupted, "--resume_from_checkpoint", "auto"))
    assert "checkpoint-7" in line, line
    assert users_files(interrupted) == before


def test_a_second_run_into_the_same_directory_is_refused_and_the_first_is_unharmed(tmp_path):
    out, hold = tmp_path / "out", tmp_path / "hold"
    hold.touch()  # the first run waits after its first step until the second one has been refused
    first = subprocess.Popen(["python", FAULTS, "--hold_while", str(hold), *RUN, "--max_steps", "2", "--save_steps", "1000",
                              "--output_dir", str(out)], cwd=ROOT, env=fresh_env(**REAL_INTERPRETER),  # its own pid
                             stderr=subprocess.PIPE, text=True)
    lock = out / ".qwen-tune" / "lock"
    while not (lock.exists() and lock.read_text()):
        assert first.poll() is None, first.stderr.read()
        time.sleep(0.05)
    second = run(out, "--overwrite_output_dir", "True")
    line = one_error_line(second)
    assert f"is in use by another qwen-tune run (pid {first.pid}" in line and "nothing was changed" in line, line
    hold.unlink()
    assert first.wait(timeout=600) == 0, first.stderr.read()
    assert os.path.isfile(out / "run_complete.json") and os.path.isfile(out / "model.safetensors")


def test_a_killed_runs_lock_does_not_outlive_it(tmp_path):
    out, hold, trace = tmp_path / "out", tmp_path / "hold", tmp_path / "trace.jsonl"
    hold.touch()  # the run waits after its first checkpoint, to be killed there
    first = subprocess.Popen(["python", FAULTS, "--hold_while", str(hold), "--trace", str(trace), *RUN, "--max_steps", "2",
                              "--save_steps", "1", "--save_total_limit", "1", "--output_dir", str(out)], cwd=ROOT,
                             env=fresh_env(), stderr=subprocess.DEVNULL)
    while not (out / "checkpoint-1" / "checkpoint_complete.json").exists():
        assert first.poll() is None
        time.sleep(0.05)
    os.kill(json.loads(trace.read_text().splitlines()[0])["pid"], signal.SIGKILL)  # the training process itself
    assert first.wait() == -signal.SIGKILL
    proc = run(out, "--resume_from_checkpoint", "auto")
    assert proc.returncode == 0 and "resuming from" in proc.stderr, proc.stderr


def test_a_dangling_symlink_as_output_dir_says_where_it_points(tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    line = one_error_line(run(link))
    assert f"is a symbolic link to {tmp_path / 'gone'}, which does not exist" in line, line


def test_a_users_readme_survives_a_trl_trainer_that_writes_its_card_at_every_checkpoint(tmp_path):
    """TRL's RewardTrainer writes README.md with each checkpoint; here the card goes to MODEL_CARD.md, once."""
    out = tmp_path / "out"
    plant(out, "README.md")
    with open(out / "README.md") as f:
        before = f.read()
    proc = subprocess.run(["python", "-m", "qwen_tune", "rm", "--data_path", os.path.join(DATA, "preference_example.json"),
                           "--max_steps", "2", "--save_steps", "1", "--per_device_train_batch_size", "2",
                           "--model_max_length", "128", "--report_to", "none", "--output_dir", str(out),
                           "--overwrite_output_dir", "True"], cwd=ROOT, env=fresh_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    with open(out / "README.md") as f:
        assert f.read() == before
    assert "qwen-tune" in (out / "MODEL_CARD.md").read_text()


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(mb)`: a directory on a file system of that size (tmpfs; skipped where mounting is not allowed)."""
    mounted = []

    def mount(mb: int):
        path = tmp_path / f"disk-{mb}mb"
        path.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}M", "tmpfs", str(path)], capture_output=True).returncode:
            pytest.skip("this machine does not let the tests mount a small file system")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def size_mb(path) -> float:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files) / 2**20


def test_a_disk_that_fills_mid_run_or_in_the_final_save_ends_in_one_line_and_keeps_the_last_checkpoint(tmp_path, small_disk):
    reference = tmp_path / "reference"
    proc = run(reference, "--save_steps", "1", "--keep_checkpoints", "True")
    assert proc.returncode == 0, proc.stderr
    checkpoint = size_mb(reference / "checkpoint-1")
    final = size_mb(reference) - size_mb(reference / "checkpoint-1") - size_mb(reference / "checkpoint-2")
    cases = {  # (disk size, flags): room for one checkpoint and a half; room for one and half the final files
        "mid-run": (int(1.5 * checkpoint), ("--max_steps", "3", "--save_steps", "1", "--save_total_limit", "1"), 1),
        "final save": (int(checkpoint + final / 2), ("--save_steps", "2"), 2),
    }
    for case, (mb, flags, kept) in cases.items():
        out = small_disk(mb) / "out"
        line = one_error_line(run(out, *flags))
        assert f"the disk holding {out} is full" in line, (case, line)
        assert f"the newest complete checkpoint is {out / f'checkpoint-{kept}'}" in line, (case, line)
        assert "--resume_from_checkpoint auto" in line
        assert os.path.isfile(out / f"checkpoint-{kept}" / "checkpoint_complete.json")
        assert not os.path.exists(out / "run_complete.json")


def test_a_run_that_fails_on_its_data_leaves_no_output_dir_behind_and_an_existing_one_as_it_was(tmp_path):
    bad = tmp_path / "trailing.json"
    bad.write_text('[\n {"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "ho"}]},\n]\n')
    existing = tmp_path / "existing"
    existing.mkdir()
    for data, out in ((tmp_path / "missing.jsonl", tmp_path / "new1"), (bad, tmp_path / "new2"), (bad, existing)):
        proc = subprocess.run(["python", "-m", "qwen_tune", "sft", "--data_path", str(data), "--output_dir", str(out)],
                              cwd=ROOT, env=fresh_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2 and data.name in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "new1").exists() and not (tmp_path / "new2").exists()
    assert existing.is_dir()  # the user's own (empty) directory is not ours to remove
