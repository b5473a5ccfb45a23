"""A checkpoint's own code and pickles run only when the user asked, in every command.

A planted checkpoint names Python classes in `auto_map` (config and tokenizer); importing any of its files writes a
marker. Every command is run on it with `y` on stdin (what transformers' "run the custom code? [y/N]" prompt reads):
each ends in one line that names the code and the flag, and the marker never appears.
"""

import io
import json
import os
import shutil
import sys

import pytest
import torch

from helpers import ROOT, run_python

DATA = os.path.join(ROOT, "data")
CODE = "open({marker!r}, 'a').write('{name} ran\\n')\nclass Planted: pass\n"


@pytest.fixture(scope="module")
def planted(tmp_path_factory, base_model_path):
    """(checkpoint with custom code, adapter on it, marker path)."""
    root = tmp_path_factory.mktemp("planted")
    checkpoint, marker = root / "custom-code", root / "marker.txt"
    shutil.copytree(base_model_path, checkpoint)
    for name in ("configuration_planted", "modeling_planted", "tokenization_planted"):
        (checkpoint / f"{name}.py").write_text(CODE.format(marker=str(marker), name=name))
    for file, auto_map in (("config.json", {"AutoConfig": "configuration_planted.Planted",
                                            "AutoModelForCausalLM": "modeling_planted.Planted"}),
                           ("tokenizer_config.json", {"AutoTokenizer": ["tokenization_planted.Planted", None]})):
        config = json.loads((checkpoint / file).read_text())
        (checkpoint / file).write_text(json.dumps({**config, "auto_map": auto_map}))
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(checkpoint),
                                                            "r": 8, "target_modules": ["q_proj"]}))
    return str(checkpoint), str(adapter), marker


def commands(model: str, adapter: str, out: str) -> dict[str, list[str]]:
    train, pairs, prompts = (os.path.join(DATA, f) for f in ("sft_example.json", "preference_example.jsonl", "grpo_example.jsonl"))
    common = ["--output_dir", out, "--max_steps", "1", "--report_to", "none"]
    return {
        "sft": ["sft", "--model_name_or_path", model, "--data_path", train, *common],
        "rm": ["rm", "--model_name_or_path", model, "--data_path", pairs, *common],
        "dpo": ["dpo", "--model_name_or_path", model, "--data_path", pairs, *common],
        "grpo": ["grpo", "--policy", model, "--prompts", prompts, "--reward_funcs", os.path.join(ROOT, "recipes", "grpo_rewards.py") + ":exact_answer",
                 "--output_dir", out],
        "ppo": ["ppo", "--policy", model, "--prompts", prompts, "--reward_funcs", os.path.join(ROOT, "recipes", "grpo_rewards.py") + ":exact_answer",
                "--output_dir", out],
        "chat": ["chat", "--model", model, "--prompt", "hi"],
        "eval": ["eval", "--model", model, "--data", train],
        "score": ["score", "--model", model, "--data", pairs, "--out", os.path.join(out, "scores.jsonl")],
        "merge": ["merge", "--adapter", adapter, "--out", out],
        "preprocess": ["preprocess", "--data", train, "--tokenizer", model],
        "chat on an adapter": ["chat", "--model", adapter, "--prompt", "hi"],
    }


def run_in_process(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """`qwen-tune ARGV` in this process with `y` answering any prompt: (exit code, stderr)."""
    from qwen_tune.cli import entry

    monkeypatch.setattr(sys, "argv", ["qwen-tune", *argv])
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 100))
    with pytest.raises(SystemExit) as exit_info:
        entry()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("command", list(commands("M", "A", "O")))
def test_custom_code_runs_in_no_command_even_with_y_on_stdin(command, planted, tmp_path, monkeypatch, capsys):
    checkpoint, adapter, marker = planted
    code, err = run_in_process(commands(checkpoint, adapter, str(tmp_path / "out"))[command], monkeypatch, capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "ships its own Python code" in lines[0] and "--trust_remote_code True" in lines[0], err
    assert "config.json (auto_map: AutoConfig, AutoModelForCausalLM)" in lines[0], err
    assert "Traceback" not in err
    assert not marker.exists(), marker.read_text()


def test_custom_code_refused_in_a_fresh_process_answering_y(planted, tmp_path):
    """The realistic attack: `yes y | qwen-tune chat --model DIR`, with transformers' prompt reading a real pipe."""
    import subprocess

    from helpers import fresh_env

    checkpoint, _, marker = planted
    proc = subprocess.run([sys.executable, "-m", "qwen_tune", "chat", "--model", checkpoint, "--prompt", "hi"], cwd=ROOT,
                          env=fresh_env(), input="y\n" * 100, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "ships its own Python code" in proc.stderr, proc.stderr
    assert not marker.exists()


def test_trust_remote_code_is_what_lets_it_run(planted, tmp_path):
    """The flag is the only key: with it, transformers imports the checkpoint's code (here, fails on the dummy class)."""
    checkpoint, _, marker = planted
    proc = run_python(["chat", "--model", checkpoint, "--prompt", "hi", "--trust_remote_code", "True"])
    assert marker.exists() and "ran" in marker.read_text(), proc.stderr
    marker.unlink()


@pytest.mark.parametrize("command", ["sft", "chat", "eval", "merge"])
def test_pickle_weights_load_in_no_command(command, base_model_path, tmp_path, monkeypatch, capsys):
    """A checkpoint with only `pytorch_model.bin` (whose unpickling could run code) is refused in one line."""
    checkpoint = tmp_path / "pickled"
    shutil.copytree(base_model_path, checkpoint)
    for name in os.listdir(checkpoint):
        if name.endswith(".safetensors"):
            os.remove(checkpoint / name)
    torch.save({}, checkpoint / "pytorch_model.bin")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(checkpoint)}))
    code, err = run_in_process(commands(str(checkpoint), str(adapter), str(tmp_path / "out"))[command], monkeypatch, capsys)
    assert code == 2 and "only pickle weights (pytorch_model.bin)" in err and "--allow_pickle_weights" in err, err
    assert "Traceback" not in err
