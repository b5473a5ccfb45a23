"""Every command's options: resolved once into a frozen config, each one read, others refused.

The commands are discovered from `cli.COMMANDS` (a new method needs no entry here); the configs are resolved for
real (`options.load`), without running anything.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import FrozenInstanceError, fields
from pathlib import Path

import pytest
import transformers
import trl

from helpers import DATA, ROOT
from qwen_tune.cli import COMMANDS
from qwen_tune.errors import UserError
from qwen_tune.options import load
from qwen_tune.options.groups import SHARED_GROUPS
from qwen_tune.options.method import TRAIN

METHODS = {name: module.METHOD for name, (path, _) in COMMANDS.items() if hasattr(module := importlib.import_module(path), "METHOD")}
LIBRARY_CONFIGS = (transformers.TrainingArguments, trl.GRPOConfig, trl.RewardConfig)


def resolved(method, *argv: str):
    """`load(method, argv)` with every input the command says it cannot run without filled in, as a user would after
    reading its messages (no list of required options is kept here)."""
    given = list(argv)
    for _ in range(8):
        try:
            return load(method, given)
        except UserError as e:
            missing = re.match(r"(?:give )?--(\w+)", str(e))
            if not missing or not ("is required" in str(e) or str(e).startswith("give")):
                raise
            given += [f"--{missing.group(1)}", "x"]
    raise AssertionError(f"{method.name}: still missing inputs after {given}")


def out_dir(method, tmp_path) -> list[str]:
    declared = {f.name for cls in method.groups.values() for f in fields(cls)}
    return ["--output_dir", str(tmp_path)] if "output_dir" in declared else []


def own_options(method):
    """(group, option) of every option qwen-tune declares for `method` (transformers' and TRL's own are theirs)."""
    return [(group, f.name) for group, cls in method.groups.items() for f in fields(cls)
            if f.init and not any(f.name in getattr(c, "__dataclass_fields__", {}) for c in LIBRARY_CONFIGS)]


def test_every_command_declares_its_options():
    """Each command's module declares its METHOD under the command's name: the training methods and the tools."""
    assert set(METHODS) == set(COMMANDS) and all(method.name == command for command, method in METHODS.items())


@pytest.mark.parametrize("command", sorted(METHODS))
def test_the_resolved_config_is_frozen(command, tmp_path):
    config = resolved(METHODS[command], *out_dir(METHODS[command], tmp_path))
    for group_name in METHODS[command].groups:
        group = getattr(config, group_name)
        if group_name == TRAIN:
            with pytest.raises(TypeError):
                group["learning_rate"] = 1.0  # transformers' values: a read-only mapping
            continue
        for f in fields(group):
            if f.init:
                with pytest.raises(FrozenInstanceError):
                    setattr(group, f.name, getattr(group, f.name))
    with pytest.raises(FrozenInstanceError):
        config.lora = None


@pytest.mark.parametrize("command", sorted(METHODS))
def test_an_option_of_another_command_has_no_effect_and_is_refused(command, tmp_path):
    mine = {f.name for cls in METHODS[command].groups.values() for f in fields(cls)}
    foreign = sorted({f.name for group in SHARED_GROUPS for f in fields(group)} - mine)
    assert foreign or command == "sft"
    for option in foreign:
        with pytest.raises(UserError, match=f"^--{option} has no effect on {command} \\(it is a .* option of other commands\\)"):
            resolved(METHODS[command], *out_dir(METHODS[command], tmp_path), f"--{option}", "1")


def test_every_option_a_command_declares_is_read_by_its_code():
    """An option nobody reads is a promise the command does not keep: each one qwen-tune declares appears as an
    attribute or key read somewhere in qwen_tune besides its declaration."""
    declaration = re.compile(r"^\s+\w+: [^=]+= field\(", re.M)
    source = "\n".join(declaration.sub("", p.read_text()) for p in Path(ROOT, "qwen_tune").rglob("*.py"))
    unread = [(command, group, option) for command, method in METHODS.items() for group, option in own_options(method)
              if not re.search(rf"\.{option}\b|[\"']{option}[\"']", source)]
    assert not unread


def test_methods_have_their_own_learning_rates(tmp_path, monkeypatch):
    """Unset --learning_rate: TRL's defaults for rm, dpo, orpo, simpo, kto and grpo on a real checkpoint, the seed's for
    sft; a tenfold one for an adapter where TRL gives one rate; the embedded model's large one."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig

    real = ["--model_name_or_path", "Qwen/Qwen3-8B"]
    rates = {command: resolved(METHODS[command], *real, "--output_dir", str(tmp_path)).train["learning_rate"]
             for command in ("sft", "rm", "dpo", "orpo", "simpo", "kto")}
    rates["grpo"] = load(METHODS["grpo"], ["--policy", "Qwen/Qwen3-8B", "--prompts", "q", "--output_dir", str(tmp_path)]).train["learning_rate"]
    assert rates == {"sft": 1e-5, "rm": trl.RewardConfig.learning_rate, "dpo": 1e-6, "orpo": ORPOConfig.learning_rate,
                     "simpo": CPOConfig.learning_rate, "kto": trl.KTOConfig.learning_rate, "grpo": trl.GRPOConfig.learning_rate}
    for command in ("dpo", "orpo", "simpo", "kto"):
        lora = resolved(METHODS[command], *real, "--use_lora", "True", "--output_dir", str(tmp_path))
        assert lora.train["learning_rate"] == 1e-5
    assert resolved(METHODS["rm"], "--output_dir", str(tmp_path)).train["learning_rate"] == 1e-2  # embedded


def test_seed_governs_lora_initialisation_bit_for_bit(tmp_path):
    """Two LoRA runs with the same --seed end with equal adapters; another seed gives other ones."""
    from safetensors.torch import load_file

    from qwen_tune.methods import sft

    def adapter(seed: int, out: str) -> dict:
        sft.main(["--data_path", f"{DATA}/sft_example.json", "--output_dir", str(tmp_path / out), "--use_lora", "True",
                  "--lora_r", "4", "--max_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", str(seed)])
        return load_file(tmp_path / out / "adapter_model.safetensors")

    first, again, other = adapter(7, "a"), adapter(7, "b"), adapter(8, "c")
    assert first.keys() == again.keys() and all(bool((first[k] == again[k]).all()) for k in first)
    assert any(not bool((first[k] == other[k]).all()) for k in first)
