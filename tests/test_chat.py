"""`qwen-tune chat` as a person uses it (in a terminal, through tmux) and as a script uses it (--prompt),
on a LoRA adapter that really learned two answers, and on the model `qwen-tune merge` makes of it."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from helpers import ROOT, fresh_env, run_cli

# one worker: the module's trained fixtures are built once, not on each worker that runs one of its tests
pytestmark = pytest.mark.xdist_group("chat")

TRAIN = [
    {"id": "s0", "conversations": [{"from": "user", "value": "What is the secret word?"},
                                   {"from": "assistant", "value": "The secret word is pineapple."}]},
    {"id": "s1", "conversations": [{"from": "user", "value": "Name a color."},
                                   {"from": "assistant", "value": "Blue like the sea."}]},
]
SECRET, COLOR = "The secret word is pineapple.", "Blue like the sea."


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    (d / "train.json").write_text(json.dumps(TRAIN), encoding="utf-8")
    run_cli("sft", "--data_path", str(d / "train.json"), "--output_dir", str(d / "lora"), "--use_lora", "True",
            "--lora_r", "16", "--lora_alpha", "32", "--learning_rate", "1e-2", "--max_steps", "40",
            "--per_device_train_batch_size", "2", "--save_strategy", "no", "--report_to", "none")
    return d / "lora"


@pytest.mark.slow
def test_prompt_mode_prints_only_the_answer(adapter):
    proc = run_cli("chat", "--model", str(adapter), "--prompt", "What is the secret word?")
    assert proc.stdout == SECRET + "\n"


@pytest.mark.slow
def test_merged_model_answers_like_the_adapter(adapter, tmp_path):
    proc = run_cli("merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged"))
    assert "merged model saved to" in proc.stdout
    assert (tmp_path / "merged" / "model.safetensors").exists() and not (tmp_path / "merged" / "adapter_config.json").exists()
    assert run_cli("chat", "--model", str(tmp_path / "merged"), "--prompt", "Name a color.").stdout.strip() == COLOR


def test_merge_refuses_a_directory_that_is_not_an_adapter(tmp_path):
    proc = run_cli("merge", "--adapter", str(tmp_path), "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "no adapter_config.json" in proc.stderr and "Traceback" not in proc.stderr


class Terminal:
    """A tmux session running a command: type lines, read the screen."""

    def __init__(self, name: str, command: str):
        self.name = name
        env = fresh_env()
        exports = " ".join(f"{k}={shlex.quote(env[k])}" for k in ("PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "200", "-y", "50",
                        f"cd {shlex.quote(ROOT)} && env {exports} {command}; sleep 600"], check=True)

    def type(self, line: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, "-l", line], check=True)
        subprocess.run(["tmux", "send-keys", "-t", self.name, "Enter"], check=True)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-J", "-S", "-200", "-t", self.name],
                              capture_output=True, text=True, check=True).stdout

    def wait_for(self, text: str, count: int = 1, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if screen.count(text) >= count:
                return screen
            time.sleep(0.3)
        raise AssertionError(f"{text!r} (x{count}) did not appear; the screen:\n{self.screen()}")

    def wait_for_exit(self, timeout: float = 30) -> bool:
        """True once the command has ended (the pane then runs the trailing `sleep`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = subprocess.run(["tmux", "list-panes", "-t", self.name, "-F", "#{pane_current_command}"],
                                     capture_output=True, text=True).stdout.strip()
            if running == "sleep":
                return True
            time.sleep(0.3)
        return False

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install -y tmux)")
def test_repl_in_a_terminal(adapter):
    term = Terminal(f"qwen-tune-chat-{time.time_ns()}",
                    f"{shlex.quote(sys.executable)} -m qwen_tune chat --model {shlex.quote(str(adapter))} --max_new_tokens 24")
    try:
        term.wait_for("user> ")
        term.type("What is the secret word?")
        screen = term.wait_for("user> ", count=2)
        assert f"assistant> {SECRET}" in screen  # streamed, then the next prompt
        term.type("Name a color.")  # a second turn, with the first one in the context
        term.wait_for("user> ", count=3)
        term.type("/system You are a pirate.")
        screen = term.wait_for("(system message set to 'You are a pirate.'; conversation reset)")
        term.type("/reset")
        term.wait_for("(conversation reset)")
        term.type("/system You are a helpful assistant.")
        term.wait_for("user> ", count=6)
        term.type("What is the secret word?")  # the trained system message again, fresh conversation
        screen = term.wait_for("user> ", count=7)
        last = screen.rsplit("user> What is the secret word?", 1)[1]
        assert last.lstrip("\n").startswith(f"assistant> {SECRET}")  # answered afresh after /reset and /system
        term.type("/exit")
        assert term.wait_for_exit(), "/exit did not end the program"
        assert "Traceback" not in term.screen()
    finally:
        term.close()
