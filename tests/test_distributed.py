"""DeepSpeed with several real ranks on CPU (gloo): ZeRO-3 shards, saves complete, matches one process."""

import json
import os
import re
import subprocess

import pytest

from helpers import DATA, ROOT, free_port, fresh_env, generate_in_fresh_process, run_cli, run_python, save_random_teacher
from qwen_tune.train import ownership

pytestmark = pytest.mark.slow
TRAIN = os.path.join(DATA, "sft_example.json")
# a few steps, same order on every layout: global step k sees samples 2k and 2k+1
FEW_STEPS = ["--max_steps", "3", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-2",
             "--report_to", "none", "--save_strategy", "no", "--train_sampling_strategy", "sequential",
             "--logging_steps", "1", "--warmup_ratio", "0"]


def recipe(name, *args, **env):
    proc = subprocess.run(["sh", os.path.join(ROOT, "recipes", name), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=fresh_env(MASTER_PORT=free_port(), **env))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def losses(out):
    return [v for _, v in json.load(open(os.path.join(out, "loss.json")))["loss"]]


@pytest.mark.support("ZeRO-3", ["qwen2"])
def test_zero3_on_two_ranks_partitions_equals_one_process_and_saves_complete_weights(tmp_path, base_model_path):
    """fp32: sh recipes/finetune_ds.sh with a batch of 2 split over 2 ZeRO-3 ranks logs the same loss at every step as
    one process with the batch of 2, and its gathered save is complete and reloads to the same model."""
    ranks = str(tmp_path / "ranks")
    proc = recipe("finetune_ds.sh", "-d", TRAIN, "-o", ranks, "--per_device_train_batch_size", "1",
                  "--gradient_checkpointing", "False", *FEW_STEPS)
    assert "+ torchrun --nproc_per_node 2" in proc.stderr
    # each of the 2 ranks holds half of the weights: ZeRO-3 really partitioned them
    # (searched anywhere: two ranks share one stderr, so a line may follow another rank's partial line)
    shards = re.findall(r"ZeRO-3: rank (\d) holds ([\d,]+) of ([\d,]+) parameter values", proc.stderr)
    assert sorted(shards) == [("0", "4,908,320", "9,816,640"), ("1", "4,908,320", "9,816,640")], shards
    single = str(tmp_path / "single")
    proc = subprocess.run(["python", "finetune.py", "--data_path", TRAIN, "--output_dir", single,
                           "--per_device_train_batch_size", "2", *FEW_STEPS], cwd=ROOT, env=fresh_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(ranks), losses(single)
    assert len(a) == len(b) == 3
    assert a == pytest.approx(b, rel=1e-4), (a, b)  # fp32 sums over 2 ranks vs one: rounding, far below a wrong step
    assert a[0] != a[-1]  # the steps really differ, so equality is not a coincidence of one value
    # the saved model is complete (no empty partitioned tensors) and trained
    check = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); b = AutoModelForCausalLM.from_pretrained(sys.argv[2])\n"
        "sb = b.state_dict()\n"
        "for k, v in m.state_dict().items():\n"
        "    assert v.shape == sb[k].shape and v.numel() > 0, k\n"
        "assert not torch.equal(m.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)\n"
        "print('complete')\n"
    )
    res = run_python([ranks, base_model_path], code=check)
    assert res.returncode == 0 and "complete" in res.stdout, res.stderr[-3000:]
    # the ZeRO-3 save reloads to the same model as the single process's: the same greedy replies
    prompts = [[{"role": "user", "content": q}] for q in ("Hi", "What is 2+2?")]
    assert generate_in_fresh_process(ranks, prompts, adapter=False) == generate_in_fresh_process(single, prompts, adapter=False)


def test_zero2_lora_adapter_reloads_with_autopeft(tmp_path):
    out = str(tmp_path / "z2lora")
    recipe("finetune_lora_ds.sh", "-d", TRAIN, "-o", out, "--per_device_train_batch_size", "1", *FEW_STEPS)
    from safetensors.torch import load_file

    lora_b = [t for name, t in load_file(os.path.join(out, "adapter_model.safetensors")).items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: every adapter matrix was trained and saved
    generate_in_fresh_process(out, [[{"role": "user", "content": "Hi"}]], adapter=True)  # AutoPeft reloads it offline


def test_two_nodes_on_localhost_train_and_save(tmp_path):
    out = str(tmp_path / "nodes")
    env = fresh_env(MASTER_PORT=free_port(), NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1")
    cmd = ["sh", os.path.join(ROOT, "recipes", "finetune_ds.sh"), "-d", TRAIN, "-o", out,
           "--per_device_train_batch_size", "1", *FEW_STEPS]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=dict(env, NODE_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    results = [n.communicate(timeout=600) for n in nodes]
    for n, (_, err) in zip(nodes, results):
        assert n.returncode == 0, err[-3000:]
    assert "--nnodes 2 --node_rank 0" in results[0][1] and "--nnodes 2 --node_rank 1" in results[1][1]
    assert os.path.exists(os.path.join(out, "model.safetensors"))
    assert len(losses(out)) == 3


def zero3_run_with_a_checkpoint(out, ranks):
    """4 steps of a global batch of 2 on `ranks` ZeRO-3 ranks, a checkpoint after every step kept (a resumed run keeps
    the checkpoint's save_steps: the one-rank run resumed from step 2 must save step 3 too); returns the step flags."""
    steps = [a if a != "3" else "4" for a in FEW_STEPS]  # --max_steps 4
    steps[steps.index("--save_strategy") + 1] = "steps"
    recipe("finetune_ds.sh", "-d", TRAIN, "-o", out, "--per_device_train_batch_size", str(2 // ranks), *steps,
           "--save_steps", "1", "--keep_checkpoints", "True", NPROC_PER_NODE=str(ranks))
    assert os.path.exists(os.path.join(out, "checkpoint-2", "checkpoint_complete.json"))
    return steps


def resume_from(checkpoint, out, ranks, steps, *more):
    """A run that died after the checkpoint's step (only the checkpoint is left), resumed on `ranks` ranks."""
    os.makedirs(out)
    subprocess.run(["cp", "-r", checkpoint, out], check=True)
    ownership.claim(out, [os.path.basename(checkpoint)])  # qwen-tune's own: it resumes only from checkpoints it wrote
    return recipe("finetune_ds.sh", "-d", TRAIN, "-o", out, "--per_device_train_batch_size", str(2 // ranks), *steps,
                  *more, "--resume_from_checkpoint", "auto", NPROC_PER_NODE=str(ranks))


# fp32 sums over another number of ranks: rounding (4e-6 seen). A lost Adam state moves step 4's loss by far more,
# and DeepSpeed's universal load giving the no-decay group weight decay moved it by 9e-5
OTHER_WORLD_REL = 2e-5


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """An uninterrupted 2-rank ZeRO-3 run, its step-2 checkpoint kept: (output dir, the step flags)."""
    full = str(tmp_path_factory.mktemp("zero3") / "full")
    return full, zero3_run_with_a_checkpoint(full, ranks=2)


@pytest.mark.xdist_group("two_rank_run")  # one worker builds the run both tests resume
def test_resume_from_a_zero3_checkpoint_continues_exactly(two_rank_run, tmp_path):
    full, steps = two_rank_run
    same = resume_from(os.path.join(full, "checkpoint-2"), str(tmp_path / "same"), 2, steps)
    assert "resuming from" in same.stderr and "universal" not in same.stderr
    assert losses(str(tmp_path / "same"))[-2:] == pytest.approx(losses(full)[-2:], rel=1e-5)


@pytest.mark.xdist_group("two_rank_run")
def test_a_zero3_checkpoint_resumes_on_another_number_of_ranks(two_rank_run, tmp_path):
    """2 -> 1, then 1 -> 2, through DeepSpeed's universal checkpoint (weights and Adam state whole, each parameter
    group's own hyperparameters): the one-rank run resumed from step 2 logs steps 3-4 of the uninterrupted two-rank
    run, and the two-rank run resumed from the one-rank run's step 3 logs its step 4."""
    full, steps = two_rank_run
    fewer = str(tmp_path / "fewer")
    proc = resume_from(os.path.join(full, "checkpoint-2"), fewer, 1, steps, "--keep_checkpoints", "True")
    assert "was saved by 2 ranks and this run has 1: its ZeRO state is loaded through DeepSpeed's universal" in proc.stderr
    assert losses(fewer)[-2:] == pytest.approx(losses(full)[-2:], rel=OTHER_WORLD_REL)
    more = str(tmp_path / "more")
    proc = resume_from(os.path.join(fewer, "checkpoint-3"), more, 2, steps)
    assert "was saved by 1 rank and this run has 2" in proc.stderr
    assert losses(more)[-1:] == pytest.approx(losses(full)[-1:], rel=OTHER_WORLD_REL)


def test_dpo_under_zero3_shards_policy_and_reference_and_learns(tmp_path):
    """Full-parameter DPO on 2 ZeRO-3 ranks: the policy is sharded, the frozen reference too, and the pairs are learned."""
    out = str(tmp_path / "dpo_z3")
    proc = subprocess.run(["python", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                           "-m", "qwen_tune", "dpo", "--data_path", os.path.join(DATA, "preference_example.json"), "--output_dir", out,
                           "--deepspeed", os.path.join(ROOT, "recipes", "ds_config_zero3.json"), "--max_steps", "3",
                           "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--report_to", "none",
                           "--save_strategy", "no", "--logging_steps", "1", "--warmup_ratio", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=fresh_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert len(re.findall(r"ZeRO-3: rank \d holds 4,908,320 of 9,816,640 parameter values", proc.stderr)) == 2
    curves = json.load(open(os.path.join(out, "loss.json")))  # logged per step, as TRL names them
    margins, accuracies = [v for _, v in curves["rewards/margins"]], [v for _, v in curves["rewards/accuracies"]]
    assert margins[0] == 0 and margins[-1] > 0.1 and accuracies[-1] == 1, curves


def test_distill_under_zero3_shards_student_and_teacher_and_samples_on_every_rank(tmp_path):
    """On-policy distillation on 2 ZeRO-3 ranks: the student and the frozen teacher (another random model of the same
    shape) are both sharded, each rank samples its replies with the student's gathered weights, and the saved student
    is whole."""
    from safetensors.torch import load_file

    out = str(tmp_path / "distill_z3")
    proc = subprocess.run(["python", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                           "-m", "qwen_tune", "distill", "--teacher", save_random_teacher(tmp_path / "teacher"),
                           "--data_path", os.path.join(DATA, "distill_example.jsonl"), "--output_dir", out,
                           "--deepspeed", os.path.join(ROOT, "recipes", "ds_config_zero3.json"), "--max_steps", "2",
                           "--per_device_train_batch_size", "2", "--max_new_tokens", "6", "--model_max_length", "128",
                           "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--warmup_ratio", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=fresh_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert len(re.findall(r"ZeRO-3: rank \d holds 4,908,320 of 9,816,640 parameter values", proc.stderr)) == 2
    assert len(re.findall(r"ZeRO-3 \(teacher\): rank \d holds 4,908,320 of 9,816,640 parameter values", proc.stderr)) == 2
    logged = re.findall(r"step (\d)/2 .*on_policy 1 .*completions/mean_length", proc.stdout + proc.stderr)
    assert logged == ["1", "2"], proc.stdout[-3000:]
    saved = load_file(os.path.join(out, "model.safetensors"))
    assert saved["model.embed_tokens.weight"].shape == (151936, 64)


def pictures_and_text(folder, tokenizer, model_type: str):
    """A tiny vision-language checkpoint and a data file whose samples alternate picture, text, picture, ...: with a
    batch of 1 on each of 2 ranks and sequential sampling, one rank's batch has a picture while the other's has none."""
    from test_image_training import colour_questions, tiny_vision_checkpoint

    base = tiny_vision_checkpoint(model_type, folder / "base", tokenizer)
    pictures = [json.loads(line) for line in colour_questions(folder, 4).read_text().splitlines()]
    data = folder / "pictures_and_text.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for pair in zip(pictures, json.load(open(TRAIN))) for row in pair))
    return base, str(data)


@pytest.mark.support("ZeRO-3", ["qwen3_5_moe"])
@pytest.mark.support("images", ["qwen3_5_moe"])
def test_zero3_on_a_hybrid_moe_vision_language_checkpoint_with_pictures_trains_every_tensor_and_saves_it_whole(tmp_path, tokenizer):
    """A tiny Qwen3.5-MoE checkpoint (Gated DeltaNet + full attention, routed experts, a vision tower) under ZeRO-3 on
    2 ranks, on pictures and text: a step where one rank's batch has a picture and the other's none runs (the ranks'
    parameter gathers pair up: zero3_pictures.py) and logs the loss of the same batch in one process; every
    language-model tensor changed (Adam moves every tensor with a gradient), the vision tower did not, the output has
    the input's tensor names and shapes (transformers' ZeRO-3 loading once made the save prefix them twice), and it
    reloads as its own class (AutoModelForImageTextToText) with the greedy replies of the same run in one process."""
    import torch

    from test_vision_language import is_vision, saved_tensors

    base, data = pictures_and_text(tmp_path, tokenizer, "qwen3_5_moe")
    few = [*FEW_STEPS[:1], "2", *FEW_STEPS[2:]]
    ranks, single = str(tmp_path / "ranks"), str(tmp_path / "single")
    proc = recipe("finetune_ds.sh", "-m", base, "-d", data, "-o", ranks, "--per_device_train_batch_size", "1",
                  "--gradient_checkpointing", "False", *few)
    assert "ZeRO-3: rank 1 holds" in proc.stderr and "loaded as Qwen3_5MoeForConditionalGeneration" in proc.stderr
    assert "packing: off: the data has images" in proc.stderr
    before, after = saved_tensors(base), saved_tensors(ranks)
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    assert [k for k in before if torch.equal(before[k], after[k]) != is_vision(k)] == []
    run_cli("sft", "--model_name_or_path", base, "--data_path", data, "--output_dir", single, "--per_device_train_batch_size",
            "2", "--gradient_checkpointing", "False", *few)
    assert losses(ranks) == pytest.approx(losses(single), rel=1e-4)  # as the qwen2 test: fp32 sums over 2 ranks vs one
    prompts = [[{"role": "user", "content": q}] for q in ("Hi", "What is 2+2?")]
    assert (generate_in_fresh_process(ranks, prompts, adapter=False, vision_language=True)
            == generate_in_fresh_process(single, prompts, adapter=False, vision_language=True))
