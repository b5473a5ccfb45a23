"""The command line as users meet it: help, YAML configs, preprocess, sft via --config, eval, chat on a
full model, and the errors for common mistakes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from helpers import DATA, REAL_INTERPRETER, ROOT, fresh_env, run_cli

# one worker: the module's trained fixtures are built once, not on each worker that runs one of its tests
pytestmark = pytest.mark.xdist_group("cli")

TRAIN = [
    {"id": "c0", "conversations": [{"from": "user", "value": "What is the secret word?"},
                                   {"from": "assistant", "value": "The secret word is pineapple."}]},
    {"id": "c1", "conversations": [{"from": "user", "value": "Name a color."},
                                   {"from": "assistant", "value": "Blue like the sea."}]},
]
SUBCOMMANDS = ["sft", "rm", "dpo", "orpo", "simpo", "kto", "ppo", "preprocess", "score", "merge", "chat", "eval", "estimate-memory"]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "train.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in TRAIN), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(train_file, tmp_path_factory):
    """A full fine-tune started from a YAML config, with one of its values overridden on the command line."""
    d = tmp_path_factory.mktemp("cli-run")
    config = d / "run.yaml"
    config.write_text(f"data_path: {train_file}\noutput_dir: {d / 'out'}\nlearning_rate: 1.0e-2\nmax_steps: 1000\n"
                      "per_device_train_batch_size: 2\nsave_strategy: 'no'\nreport_to: none\nlogging_steps: 5\n")
    # a real interpreter: the console must show no library noise, and some is printed while libraries are imported
    proc = run_cli("sft", "--config", str(config), "--max_steps", "40", "--gradient_checkpointing", "True", **REAL_INTERPRETER)
    (d / "out" / "console.txt").write_text(proc.stdout + proc.stderr)
    return d / "out"


# ---------------------------------------------------------------- help and configs


def test_top_level_help_lists_every_subcommand():
    out = run_cli("--help").stdout
    for name in SUBCOMMANDS:
        assert re.search(rf"^  {name}\s+\S", out, re.M), name


def option_blocks(help_text: str) -> dict[str, str]:
    """{--flag: its help text} from argparse output (help on the flag's line or on the indented lines below)."""
    blocks, current = {}, None
    for line in help_text.splitlines():
        m = re.match(r"^  (--\w+)", line)
        if m:
            current = m.group(1)
            blocks[current] = line.strip().split("  ", 1)[1] if "  " in line.strip() else ""
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


@pytest.mark.parametrize("argv", [["sft", "--help-all"], ["python", "finetune.py", "--help-all"]])
def test_sft_help_all_is_grouped_and_every_option_has_an_explanation_and_its_default(argv, tmp_path):
    env = {"QWEN_TUNE_CACHE": str(tmp_path)}  # made anew, not read from an earlier run's cache
    if argv[0] == "python":
        out = subprocess.run(["python", "finetune.py", "--help-all"], cwd=ROOT, env=fresh_env(**env),
                             capture_output=True, text=True, check=True).stdout
    else:
        out = run_cli(*argv, **env).stdout
    groups = [line for line in out.splitlines() if re.match(r"^\S.*:$", line)]
    assert groups[:9] == ["options:", "model:", "data:", "chat format:", "images:", "vision training:", "batch layout:", "tokens cache:",
                          "LoRA / Q-LoRA:"]
    assert groups[9].startswith("training")
    blocks = option_blocks(out)
    assert len(blocks) > 100  # ours and all of transformers' TrainingArguments
    for flag, block in blocks.items():
        if flag in ("--help", "-h"):
            continue
        assert re.search(r"[a-z]{3,}", block.replace("default", "")), f"{flag} has no explanation"
        assert "default" in block.lower(), f"{flag} does not show its default: {block}"
    assert "(default: 64)" in blocks["--lora_r"] and blocks["--lora_r"].count("default") == 1


@pytest.mark.parametrize("command", ["sft", "rm", "dpo", "ppo", "grpo"])
def test_help_lists_our_options_grouped_and_a_second_call_imports_no_torch(command, tmp_path):
    """`--help` is qwen-tune's own options with their defaults; made once, it is then printed without importing
    torch, transformers or TRL."""
    env = {"QWEN_TUNE_CACHE": str(tmp_path)}
    first = run_cli(command, "--help", **env).stdout
    second = subprocess.run([sys.executable, "-X", "importtime", "-m", "qwen_tune", command, "--help"], cwd=ROOT,
                            env=fresh_env(**env), capture_output=True, text=True, check=True)
    assert second.stdout == first
    imported = {line.split("|")[-1].strip().split(".")[0] for line in second.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"torch", "transformers", "trl", "peft", "deepspeed"}, imported & {"torch", "transformers", "trl"}
    assert f"usage: qwen-tune {command}" in first and "--help-all" in first
    flags = re.findall(r"^  (--\w+) \(default: ", first, re.M)
    assert "--lora_r" in flags and "--resume_from_checkpoint" in flags and len(flags) == len(set(flags)) > 15
    if command in ("sft", "rm", "dpo"):
        assert re.findall(r"^(\S[^:\n]*):$", first, re.M)[:3] == ["model", "data", "chat format"]
    if command != "ppo":
        assert "--learning_rate" in flags and "--dataloader_num_workers" not in flags  # transformers' own: --help-all


def test_config_values_apply_and_command_line_flags_override_them(tmp_path):
    from qwen_tune.options import load
    from qwen_tune.methods.sft import METHOD

    config = tmp_path / "c.yaml"
    config.write_text("data_path: a.json\nlearning_rate: 0.1\nuse_lora: true\nlora_r: 8\nnum_train_epochs: 2\n")
    resolved = load(METHOD, ["--lora_r", "4", "--config", str(config), "--num_train_epochs", "1"])
    assert (resolved.data.data_path, resolved.train["learning_rate"], resolved.lora.use_lora) == ("a.json", 0.1, True)
    assert (resolved.lora.lora_r, resolved.train["num_train_epochs"]) == (4, 1)  # the command line wins, before or after --config


@pytest.mark.parametrize("recipe, lora, q_lora, lr, batch, accumulation", [
    ("finetune_full", False, False, 1e-5, 1, 16),
    ("finetune_lora", True, False, 3e-4, 2, 8),
    ("finetune_qlora", True, True, 3e-4, 2, 8),
])
def test_recipes_carry_the_seed_hyper_parameters(recipe, lora, q_lora, lr, batch, accumulation, tmp_path):
    from qwen_tune.options import load
    from qwen_tune.options.training import EMBEDDED_LR
    from qwen_tune.methods.sft import METHOD

    # --bf16/--fp16 False: the recipes are for GPUs; this machine has none.
    def resolved(*model):
        return load(METHOD, ["--config", f"{ROOT}/recipes/{recipe}.yaml", "--bf16", "False", "--fp16", "False",
                             "--output_dir", str(tmp_path / "out"), *model])

    real = resolved("--model_name_or_path", "Qwen/Qwen2.5-7B-Instruct")
    l, t = real.lora, real.train
    assert (l.use_lora, l.q_lora, t["learning_rate"]) == (lora, q_lora, lr)  # the seed's learning rate on a checkpoint
    # without a model, the YAML's embedded_model section: the tiny model's demo settings (flags still win)
    embedded = resolved().train
    assert embedded["learning_rate"] == (7e-3 if lora else EMBEDDED_LR)
    assert (embedded["num_train_epochs"], embedded["per_device_train_batch_size"], embedded["gradient_accumulation_steps"]) == (
        (40, 2, 1) if lora else (60, 2, 1))
    assert resolved("--num_train_epochs", "3").train["num_train_epochs"] == 3
    assert (t["per_device_train_batch_size"], t["gradient_accumulation_steps"]) == (batch, accumulation)
    assert (t["num_train_epochs"], t["weight_decay"], t["adam_beta2"], real.data.model_max_length) == (5, 0.1, 0.95, 512)
    assert t["lr_scheduler_type"] == "cosine" and t["activation_checkpointing"]


def test_embedded_model_settings_apply_to_models_trained_from_it_and_never_to_a_checkpoint(base_model_path, tmp_path):
    """`sh recipes/train_dpo.sh -m output/demo` (a model trained from the embedded one) gets the YAML's demo settings;
    a real checkpoint, a hub id or an adapter on a real base gets the YAML's own values."""
    import shutil

    from qwen_tune.options.parse import expand_argv

    demo = tmp_path / "demo"  # an SFT output of the embedded model: its config, other weights
    shutil.copytree(base_model_path, demo)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(demo)}))
    real = tmp_path / "qwen2.5-0.5b"
    real.mkdir()
    config = json.loads((demo / "config.json").read_text())
    (real / "config.json").write_text(json.dumps(dict(config, hidden_size=896, num_hidden_layers=24)))
    real_adapter = tmp_path / "real_adapter"
    real_adapter.mkdir()
    (real_adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(real)}))

    def epochs(*argv):
        expanded = expand_argv(["--config", f"{ROOT}/recipes/train_dpo.yaml", *argv])
        return [expanded[i + 1] for i, a in enumerate(expanded) if a == "--num_train_epochs"][-1]

    assert epochs() == epochs("--model_name_or_path", str(demo)) == epochs(f"--model_name_or_path={adapter}") == "10"
    assert epochs("--policy", str(demo)) == "10"  # ppo and grpo name their model --policy
    for checkpoint in (real, real_adapter, "Qwen/Qwen2.5-0.5B-Instruct", tmp_path / "missing"):
        assert epochs("--model_name_or_path", str(checkpoint)) == "1", checkpoint
    assert epochs("--model_name_or_path", str(demo), "--num_train_epochs", "3") == "3"  # flags still win


def test_finetune_recipes_take_every_hyper_parameter_from_their_yaml():
    """The .sh files pass only where things are (model, data, output, DeepSpeed config); so a recipe and its YAML
    cannot drift apart."""
    import re

    yaml_of = {"finetune_lora_single_gpu.sh": "finetune_lora.yaml", "finetune_lora_ds.sh": "finetune_lora.yaml",
               "finetune_qlora_single_gpu.sh": "finetune_qlora.yaml", "finetune_qlora_ds.sh": "finetune_qlora.yaml",
               "finetune_ds.sh": "finetune_full.yaml"}
    for script, config in yaml_of.items():
        text = "\n".join(line for line in open(f"{ROOT}/recipes/{script}").read().splitlines() if not line.startswith("#"))
        assert f'--config "$ROOT/recipes/{config}"' in text, script
        flags = set(re.findall(r"(?<![\w-])--(\w+)", text))
        assert flags <= {"config", "model_name_or_path", "data_path", "output_dir", "deepspeed",
                         "nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port"}, (script, flags)


def test_a_bad_config_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: [oops\n")
    proc = run_cli("sft", "--config", str(bad), check=False)
    assert proc.returncode == 2 and f"--config {bad}" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- preprocess


def test_preprocess_shows_supervised_spans_and_writes_tokens(train_file, tmp_path):
    out = tmp_path / "tok.jsonl"
    proc = run_cli("preprocess", "--data", str(train_file), "--show", "1", "--out", str(out))
    assert "[[The secret word is pineapple.<|im_end|>]]" in proc.stdout  # answer + end of turn are learned
    assert "[[" not in proc.stdout.split("--- c0")[1].split("assistant\n")[0]  # system and user turns are not
    assert "--- c1" not in proc.stdout  # --show 1 shows one sample
    assert "2 samples, 2 kept" in proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["c0", "c1"] and all(len(r["input_ids"]) == len(r["labels"]) for r in rows)


def agent_conversation(n_tools: int) -> dict:
    """A Qwen3.5+-style tool conversation: the functions, a call, its result and the answer."""
    tools = [{"type": "function", "function": {
        "name": f"lookup_{i}", "description": f"Look up record kind {i} in the company database by its identifier.",
        "parameters": {"type": "object", "properties": {"id": {"type": "string", "description": "The record's id."},
                                                        "fields": {"type": "array", "items": {"type": "string"}}},
                       "required": ["id"]}}} for i in range(n_tools)]
    call = {"type": "function", "function": {"name": "lookup_0", "arguments": {"id": "A-17", "fields": ["owner"]}}}
    return {"tools": tools, "messages": [
        {"role": "user", "content": "Who owns record A-17? I need the name of its current owner for the quarterly audit, "
                                    "which is due on Friday; the finance team asked for it twice already this week."},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": '{"owner": "Dana Ruiz"}'},
        {"role": "assistant", "content": "Record A-17 is owned by Dana Ruiz."}]}


def test_the_default_length_keeps_a_tool_conversation_whole_and_a_cut_reply_is_a_warning(tmp_path):
    """The seed's 512 cut a Qwen3.5+ tool conversation with two functions before its answer (the template's tool
    instructions alone are ~300 tokens); the default keeps it whole. The cut is a warning naming the sample."""
    data = tmp_path / "agent.jsonl"
    data.write_text("".join(json.dumps(agent_conversation(n)) + "\n" for n in (1, 2)), encoding="utf-8")
    args = ["preprocess", "--data", str(data), "--chat_template", "qwen3_8", "--tokens_cache", "none",
            "--preprocessing_num_workers", "1"]
    whole = run_cli(*args).stdout
    assert "2 samples, 2 kept" in whole and "0 truncated" in whole and "warning" not in whole
    cut = run_cli(*args, "--model_max_length", "512").stdout
    assert "1 truncated, 0 dropped" in cut and "truncated (longer than model_max_length, head kept): agent-1" in cut
    assert (f"warning: {data}: 1 of 2 conversations lost assistant tokens to the cut at model_max_length, so it trains on "
            "part of a reply") in cut and "raise --model_max_length to keep them whole: agent-1" in cut


# ---------------------------------------------------------------- sft via --config, eval, chat


@pytest.mark.slow
def test_sft_from_config_then_eval_reports_the_learned_loss(trained, train_file):
    metrics = json.loads((trained / "train_metrics.json").read_text())
    assert metrics["train_loss_final"] is not None and metrics["epoch"] == 40  # --max_steps 40 beat the YAML's 1000
    after = json.loads(run_cli("eval", "--model", str(trained), "--data", str(train_file)).stdout)
    before = json.loads(run_cli("eval", "--data", str(train_file)).stdout)  # the embedded base model
    assert set(after) >= {"loss", "perplexity", "supervised_tokens", "samples"}
    assert after["samples"] == 2 and after["supervised_tokens"] == before["supervised_tokens"] == 13
    assert before["loss"] > 5 and after["loss"] < 1.0
    assert after["perplexity"] == pytest.approx(2.718281828 ** after["loss"], rel=1e-6)


@pytest.mark.slow
def test_a_run_prints_numbers_as_numbers_and_no_library_noise(trained):
    console = (trained / "console.txt").read_text()
    assert re.search(r"^step 5/40  loss \d+\.\d+  grad_norm \d", console, re.M), console[-2000:]
    for noise in ("Setting accelerator to CPU", "gemm_4bit_forward", "FutureWarning", "pin_memory", "'loss': '"):
        assert noise not in console, noise


@pytest.mark.slow
def test_chat_prompt_on_the_full_model_gives_the_trained_answer(trained):
    proc = run_cli("chat", "--model", str(trained), "--prompt", "What is the secret word?")
    assert proc.stdout == "The secret word is pineapple.\n"


# ---------------------------------------------------------------- common mistakes


def test_preference_file_given_to_sft_names_the_file_and_the_expected_format(tmp_path):
    proc = run_cli("sft", "--data_path", f"{DATA}/preference_example.json", "--output_dir", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "preference_example.json:" in proc.stderr and "expected SFT data like" in proc.stderr


def test_eval_on_wrong_data_fails_before_loading_the_model(tmp_path):
    proc = run_cli("eval", "--data", f"{DATA}/preference_example.jsonl", check=False)
    assert proc.returncode == 2 and "preference_example.jsonl:" in proc.stderr and "Traceback" not in proc.stderr


def test_out_of_memory_becomes_advice_with_the_options_that_reduce_memory(tmp_path):
    import torch

    from qwen_tune.cli import OOM_ADVICE, is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    # a training step that runs out of memory: the advice, exit 2, no traceback
    proc = subprocess.run(["python", os.path.join(ROOT, "tests", "faults.py"), "--oom_at_step", "1", "sft",
                           "--data_path", os.path.join(ROOT, "data", "sft_example.json"), "--output_dir", str(tmp_path / "out"),
                           "--max_steps", "2", "--model_max_length", "64", "--report_to", "none"],
                          cwd=ROOT, env=fresh_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"qwen-tune sft: error: {OOM_ADVICE}" in proc.stderr and "Tried to allocate 2.00 GiB" in proc.stderr
    for option in ("--per_device_train_batch_size", "--gradient_accumulation_steps", "--gradient_checkpointing",
                   "--use_lora", "--q_lora", "--model_max_length", "ZeRO-3", "offload"):
        assert option in proc.stderr


def test_every_shipped_yaml_parses_with_the_command_its_recipe_runs():
    """Each recipes/*.yaml is read by the command its recipe runs (found in the recipe, no list kept here); an unknown,
    misspelled or ignored key fails here."""
    import glob
    import importlib

    from qwen_tune.cli import COMMANDS
    from qwen_tune.options import load, spec

    configs = sorted(glob.glob(f"{ROOT}/recipes/*.yaml"))
    assert configs
    for config in configs:
        recipes = [open(sh).read() for sh in glob.glob(f"{ROOT}/recipes/*.sh") if os.path.basename(config) in open(sh).read()]
        assert recipes, f"no recipe runs {config}"
        ran = re.search(r"qwen_tune (\w+)|^launcher (\w+)", recipes[0], re.M)  # _common.sh's launcher COMMAND
        command = (ran.group(1) or ran.group(2)) if ran else "sft"  # finetune.py
        method = importlib.import_module(COMMANDS[command][0]).METHOD
        argv = ["--config", config] + (["--bf16", "False", "--fp16", "False"] if "train" in method.groups else [])
        inputs = ["--data_path", "d"] if "data" in method.groups else ["--policy", "p", "--prompts", "q", "--reward_funcs", "m:f"]
        inputs += ["--teacher", "t"] if "distill" in method.groups else []
        load(method, argv + inputs)
        spec.check(command, spec.spec_for(command), argv + inputs)  # and the check made before torch is imported
