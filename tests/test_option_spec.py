"""`--help` and option mistakes are answered before torch is imported (options/spec.py), in the words the real
parser would use, and the shipped specs are those of the installed parsers."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import subprocess
import sys

import pytest

from helpers import ROOT, fresh_env

HEAVY = {"torch", "transformers", "trl", "peft", "deepspeed"}


@pytest.mark.parametrize("argv, says", [
    (["sft", "--help"], "usage: qwen-tune sft"),
    (["sft", "--no_such_flag"], "qwen-tune sft: error: unknown option --no_such_flag (see --help)"),
    (["sft", "--lora_r", "abc"], "qwen-tune sft: error: argument --lora_r/--lora-r: invalid int value: 'abc'"),
    (["chat", "--lora_r", "8"], "qwen-tune chat: error: --lora_r has no effect on chat"),
])
def test_help_and_option_mistakes_are_answered_before_torch_is_imported(argv, says, tmp_path):
    """A real interpreter (the forkserver's children have torch loaded already) and an empty cache: nothing made by
    an earlier run helps."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "qwen_tune", *argv], cwd=ROOT, capture_output=True,
                          text=True, env=fresh_env(QWEN_TUNE_CACHE=str(tmp_path)), timeout=60)
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & HEAVY, imported & HEAVY
    messages = proc.stdout + "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("import time:"))
    assert says in messages and proc.returncode == (0 if "--help" in argv else 2), (proc.returncode, messages)
    assert "Traceback" not in messages


def answer(check, *args) -> str:
    """What a check says: argparse's message on stderr (exit 2) or a UserError's text; "" when it accepts."""
    from qwen_tune.errors import UserError

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            check(*args)
        except UserError as e:
            return str(e)
        except SystemExit:
            return err.getvalue().strip().splitlines()[-1]
    return ""


def test_the_early_check_accepts_and_refuses_exactly_what_the_parser_does(tmp_path):
    from qwen_tune.methods.sft import METHOD
    from qwen_tune.options import spec
    from qwen_tune.options.parse import parse_values

    yaml = tmp_path / "run.yaml"
    yaml.write_text("use_lora: true\nreport_to: [none]\nlearning_rat: 0.1\n")
    lines = [
        ["--use_lora", "--no_packing", "--lora_r", "8", "--learning_rate", "1e-3", "--optim", "adamw_torch", "--report_to",
         "none", "--gradient_checkpointing", "True", "--lr_scheduler_type", "linear", "--evaluation_strategy",
         "steps", "--debug", "underflow_overflow", "--save-steps", "5", "--q_lora=False"],
        ["--use_lora", "maybe"], ["--optim", "sgdd"], ["--num_train_epochs", "two"], ["--lora_r"], ["--learning_rat", "1"],
        ["--policy", "x"], ["--lora"], ["--config", str(yaml)], ["stray"],
    ]
    shipped = spec.spec_for("sft")
    said = [answer(spec.check, "sft", shipped, argv) for argv in lines]
    assert said == [answer(parse_values, "sft", METHOD.groups, argv) for argv in lines]
    assert said[0] == "" and all(said[1:]), said
    assert "unknown option --learning_rat (did you mean --learning_rate?)" in said[-2]  # from the YAML


def test_the_shipped_specs_are_those_of_the_installed_parsers():
    """If this fails after an option changed: python -m qwen_tune.options.spec"""
    from qwen_tune.cli import COMMANDS
    from qwen_tune.options import spec

    shipped = json.loads(spec.SHIPPED.read_text(encoding="utf-8"))
    if shipped["libraries"] != spec.library_versions():
        pytest.skip(f"specs shipped for {shipped['libraries']}, installed {spec.library_versions()}: runs make their own")
    for name, (module, _) in COMMANDS.items():
        assert shipped["commands"][name] == spec.describe(name, importlib.import_module(module).METHOD.groups), name


def test_under_other_library_versions_the_first_run_keeps_the_spec(tmp_path, monkeypatch):
    from qwen_tune.options import spec
    from qwen_tune.options.parse import parse_values
    from qwen_tune.tools.merge import METHOD

    monkeypatch.setenv("QWEN_TUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(spec, "library_versions", lambda: {"transformers": "9.0", "trl": "9.0"})
    assert spec.spec_for("merge") is None  # not the shipped one: the parsers may differ
    parse_values("merge", METHOD.groups, ["--adapter", "a"])
    assert spec.spec_for("merge") == spec.describe("merge", METHOD.groups)
