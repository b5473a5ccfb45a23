"""SFT end to end on the embedded model: full, LoRA and Q-LoRA learn, save, and reload elsewhere."""

import json
import os

import pytest
import torch

from helpers import DATA, ROOT, assert_finished_sft_output, generate_in_fresh_process, run_cli, run_python
from qwen_tune.errors import UserError

# Short conversations the tiny model can learn in a few dozen steps.
TRAIN = [
    ("Who are you?", "I am Tuna, an assistant tuned with qwen-tune."),
    ("你好", "你好！我是金枪鱼。"),
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Name a prime number.", "Seven is a prime number."),
]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, (q, a) in enumerate(TRAIN):
            f.write(json.dumps({"id": f"t{i}", "messages": [{"role": "user", "content": q},
                                                          {"role": "assistant", "content": a}]}, ensure_ascii=False) + "\n")
    return str(path)


COMMON = ["--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--logging_steps", "5",
          "--save_strategy", "no", "--report_to", "none"]


def logged_losses(out):
    state = json.load(open(os.path.join(out, "train_metrics.json")))
    return state


@pytest.mark.slow
@pytest.mark.support("Q-LoRA", ["qwen2"])
def test_qlora_learns_and_reloads_in_fresh_process(train_file, tmp_path):
    """Q-LoRA end to end: it learns, saves a complete adapter, and a new offline process generates the trained answers.
    Full and LoRA fine-tuning are shown the same way by the README's main job and LoRA recipe (tests/test_readme.py)."""
    out = str(tmp_path / "qlora")
    # at 1e-2 an adapter is at the edge of stability on the embedded model (loss 1.1-1.9 over seeds, and once a
    # degenerate "Seven is is is ..."); at 5e-3 it reached 1.05 on every seed tried
    proc = run_cli("sft", "--data_path", train_file, "--output_dir", out, *COMMON, "--num_train_epochs", "60",
                   "--learning_rate", "5e-3", "--use_lora", "True", "--q_lora", "True", "--lora_r", "16", "--lora_alpha", "32")
    assert "Saved to" in proc.stderr and "from_pretrained" in proc.stderr
    assert_finished_sft_output(out, adapter=True)
    # greedy generation in a new offline process reproduces the trained answers
    prompts = [[{"role": "user", "content": q}] for q, _ in TRAIN]
    answers = generate_in_fresh_process(out, prompts, adapter=True)
    assert answers == [a for _, a in TRAIN]


@pytest.mark.slow
def test_finetune_py_is_the_seed_entry_point(tmp_path):
    out = str(tmp_path / "seed")
    import subprocess

    from helpers import fresh_env

    proc = subprocess.run(["python", "finetune.py", "--data_path", os.path.join(DATA, "sft_example.json"),
                           "--output_dir", out, "--max_steps", "2", "--lazy_preprocess", "True", "--bf16", "False",
                           "--warmup_ratio", "0.01", "--save_strategy", "no", "--report_to", "none"],
                          cwd=ROOT, env=fresh_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert os.path.exists(os.path.join(out, "model.safetensors"))
    assert "12 samples, 12 kept" in proc.stderr


def test_qlora_base_is_really_4bit(base_model_path):
    import bitsandbytes as bnb

    from qwen_tune.models.lora import add_lora
    from qwen_tune.models.model import load_model

    model = load_model(base_model_path, q_lora=True)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.dtype == torch.uint8 and q_proj.weight.quant_state.quant_type == "nf4"
    model = add_lora(model, r=8, alpha=16, dropout=0.0, q_lora=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_a_gpu_yaml_on_a_cpu_reports_the_data_mistake_first_and_falls_back_to_fp32(tmp_path):
    """The README's YAML example on a machine without a GPU: the missing data file is the error, not bf16;
    with the file present, its bf16 becomes fp32 with one line saying so."""
    import torch

    from qwen_tune.methods import sft
    from qwen_tune.options import load

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="/nonexistent.json"):
        sft.main(["--config", os.path.join(ROOT, "recipes", "finetune_lora.yaml"), "--data_path", "/nonexistent.json",
                  "--output_dir", str(tmp_path / "o")])
    for yaml_file, flag in (("finetune_lora.yaml", "--bf16"), ("finetune_qlora.yaml", "--fp16")):
        config = load(sft.METHOD, ["--config", os.path.join(ROOT, "recipes", yaml_file), "--output_dir", str(tmp_path / "p")])
        assert not config.train["bf16"] and not config.train["fp16"]
        assert config.notes == (f"{flag} True asked for, but there is no CUDA GPU: training in fp32 on the CPU",)


def test_a_hub_id_without_network_fails_at_once_with_what_to_do(tmp_path, monkeypatch):
    """Not cached and no way to the hub (an endpoint nobody answers, or HF_HUB_OFFLINE): the message comes from our
    one connection attempt before any hub call (the hub client's retries took a minute, then a traceback)."""
    proc = run_cli("sft", "--model_name_or_path", "Qwen/Qwen2.5-0.5B-Instruct", "--data_path", os.path.join(DATA, "sft_example.json"),
                   "--output_dir", str(tmp_path / "o"), check=False, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9",
                   HF_HOME=str(tmp_path / "hf"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert ("Qwen/Qwen2.5-0.5B-Instruct: not a local directory and not in the Hugging Face cache, and 127.0.0.1 cannot "
            "be reached") in proc.stderr
    assert "hf download Qwen/Qwen2.5-0.5B-Instruct --local-dir DIR" in proc.stderr
    # HF_HUB_OFFLINE, as the hub client read it when it was imported: no connection is tried at all
    from huggingface_hub import constants

    from qwen_tune.models.model import resolve_model_path

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://example.invalid")  # would fail differently if it were tried
    with pytest.raises(UserError, match="Qwen/Qwen2.5-0.5B-Instruct: not a local directory and not in the Hugging Face "
                                        "cache, and HF_HUB_OFFLINE is set; download it where there is network"):
        resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--q_lora", "True"], "add --use_lora True"),
        (["--model_name_or_path", "/nonexistent/model"], "no such directory"),
        (["--data_path", "/nonexistent.json"], "/nonexistent.json"),
        (["--no_such_flag", "1"], "unknown option --no_such_flag (see --help)"),
        (["--num_train_epoch", "1"], "unknown option --num_train_epoch (did you mean --num_train_epochs?)"),  # no abbreviations
    ],
)
def test_user_mistakes_get_a_clear_message_and_no_traceback(args, message, tmp_path):
    base = ["--data_path", os.path.join(DATA, "sft_example.json"), "--output_dir", str(tmp_path / "o")]
    proc = run_cli("sft", *base, *args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_data_is_reported_with_file_and_line_before_any_model_loads(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": "hi"}]}\n'
                   '{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}\n')
    proc = run_cli("sft", "--data_path", str(bad), "--output_dir", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{bad}:2" in proc.stderr and f"{bad}:3" in proc.stderr
    assert "Loading weights" not in proc.stderr


def test_gradient_accumulation_equals_one_big_batch(base_model_path, tokenizer, tmp_path):
    import copy

    from qwen_tune.data.chat_format import resolve_format

    """4 micro-batches of 1 give the same update as one batch of 4: the loss is the mean over the step's tokens."""
    from qwen_tune.options import TrainingArguments
    from qwen_tune.data.collate import PackedCollator
    from in_memory_sft import SFTDataset, encode_conversations
    from qwen_tune.data.read import Conversation
    from qwen_tune.models.model import load_model
    from qwen_tune.methods.sft import SFTLossTrainer

    # very different numbers of supervised tokens, so a mean of per-micro-batch means would differ
    answers = ["Yes.", "A much longer answer with many more supervised tokens than the others have.", "No.", "Maybe so, friend."]
    convs = [Conversation(str(i), [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": a}], "t")
             for i, a in enumerate(answers)]
    samples, _ = encode_conversations(convs, resolve_format(copy.copy(tokenizer), system_message=""), 512)

    def one_step(batch, accum):
        torch.manual_seed(0)
        model = load_model(base_model_path)
        model.config.use_cache = False
        args = TrainingArguments(output_dir=str(tmp_path / f"b{batch}"), per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=accum, max_steps=1, learning_rate=1.0, optim="sgd",
                                 weight_decay=0.0, warmup_ratio=0.0, lr_scheduler_type="constant", report_to="none",
                                 save_strategy="no", train_sampling_strategy="sequential", logging_steps=1)
        before = model.lm_head.weight.detach().clone()
        SFTLossTrainer(model=model, args=args, train_dataset=SFTDataset(samples), data_collator=PackedCollator()).train()
        return before, {n: p.detach().clone() for n, p in model.named_parameters()}

    before, big = one_step(4, 1)
    _, accumulated = one_step(1, 4)
    assert not torch.equal(before, big["model.embed_tokens.weight"])  # the step did update the (tied) output weights
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-4, atol=1e-6, msg=name)


TOOL_CALL_GENERATE = r"""
import json, sys
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
out, messages, tools = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
model = AutoPeftModelForCausalLM.from_pretrained(out).eval()
tok = AutoTokenizer.from_pretrained(out)
ids = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, enable_thinking=False,
                              return_tensors="pt", return_dict=True)
gen = model.generate(**ids, max_new_tokens=40, do_sample=False)
print(json.dumps(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)))
"""


@pytest.mark.slow
def test_lora_learns_a_tool_call_and_serves_it_with_the_saved_template(tmp_path):
    """Tool-call data with the official Qwen3 template: the reloaded adapter, prompted by the saved tokenizer's
    own apply_chat_template(tools=...), generates the trained call on a held-out question."""
    from qwen_tune.data.templates import official_templates

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # a JSON string
    data = tmp_path / "tools.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for q in ["What is the weather in Paris?", "Is it raining in Paris right now?", "Paris weather, please.",
                  "Tell me the weather in Paris."]:
            f.write(json.dumps({"tools": tools, "messages": [{"role": "user", "content": q},
                                                             {"role": "assistant", "content": "", "tool_calls": [call]}]}) + "\n")
    out = str(tmp_path / "out")
    proc = run_cli("sft", "--data_path", str(data), "--output_dir", out, "--chat_template", "qwen3", "--use_lora", "True",
                   "--lora_r", "16", "--lora_alpha", "32", "--num_train_epochs", "60", "--per_device_train_batch_size", "2",
                   "--learning_rate", "1e-2", "--logging_steps", "60", "--save_strategy", "no", "--report_to", "none")
    assert "format: chat template qwen3" in proc.stderr
    saved = json.load(open(os.path.join(out, "tokenizer_config.json"))).get("chat_template")
    if saved is None:
        saved = open(os.path.join(out, "chat_template.jinja"), encoding="utf-8").read()
    assert saved.strip() == official_templates()["qwen3"].read_text(encoding="utf-8").strip()
    held_out = [{"role": "user", "content": "How is the weather in Paris today?"}]
    gen = run_python([out, json.dumps(held_out), json.dumps(tools)], code=TOOL_CALL_GENERATE, timeout=300)
    assert gen.returncode == 0, gen.stderr
    reply = json.loads(gen.stdout.strip().splitlines()[-1])
    assert reply.startswith("<tool_call>\n") and reply.endswith("\n</tool_call>"), reply
    parsed = json.loads(reply[len("<tool_call>\n"):-len("\n</tool_call>")])
    assert parsed == {"name": "get_weather", "arguments": {"city": "Paris"}}


@pytest.mark.slow
def test_val_size_holds_out_distinct_samples_and_reports_their_loss_and_the_best_checkpoint(tmp_path):
    """--val_size 3 on a weighted mixture (tool samples repeated 2-3 times): 3 distinct samples are evaluated, each once,
    and every copy of them leaves training; the eval loss and perplexity are printed at each evaluation and at the
    end, and the summary names the best step."""
    import math
    import re
    from fractions import Fraction

    from qwen_tune.data.mixture import draw

    tools, chat = os.path.join(DATA, "sft_tools_example.jsonl"), os.path.join(DATA, "sft_example.jsonl")
    out = tmp_path / "o"
    proc = run_cli("sft", "--data_path", f"{tools}:0.7,{chat}:0.3", "--chat_template", "qwen3", "--output_dir", str(out),
                   "--val_size", "3", "--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "1", "--save_steps", "1",
                   "--report_to", "none")
    metrics = json.loads((out / "train_metrics.json").read_text())
    held = metrics["data"]["eval"]["ids"]
    assert len(held) == 3 and not any("#" in i for i in held)  # distinct samples, each once
    # how often the mixture drew each held-out sample: all its copies left training with it
    ids = [[json.loads(line)["id"] for line in open(path)] for path in (tools, chat)]
    picks = draw([(tools, Fraction(7, 10), len(ids[0])), (chat, Fraction(3, 10), len(ids[1]))], seed=42)[0]
    drawn = [ids[source][i] for source, picked in enumerate(picks) for i in picked]
    copies = sum(drawn.count(i) for i in held) - 3
    distinct = len(set(drawn))
    assert copies > 0 and (f"eval: 3 of {distinct} distinct training samples held out for evaluation (--val_size 3, seed 42); "
                           f"their {copies} copies in the mixture left training too: {', '.join(held)}") in proc.stderr
    assert metrics["eval_samples_per_second"] * metrics["eval_runtime"] == pytest.approx(3, rel=0.05)  # evaluated once each
    # the eval loss and its perplexity at each evaluation and at the end, each on a line of its own
    during = [(int(s), float(loss), float(ppl)) for s, loss, ppl in
              re.findall(r"(?m)^eval at step (\d)/2: loss (\S+)  perplexity (\S+)$", proc.stdout)]
    assert [s for s, _, _ in during] == [1, 2] and all(ppl == pytest.approx(math.exp(loss), rel=1e-3) for _, loss, ppl in during)
    final = f"eval of the final model (step 2): loss {metrics['eval_loss']:.4g}  perplexity {metrics['eval_perplexity']:.4g}"
    assert final in proc.stdout.splitlines()
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    # the summary names the best step; a checkpoint other than the result is kept
    step, loss, _ = min(during, key=lambda d: d[1])
    assert metrics["best_step"] == step and f"{metrics['best_eval_loss']:.4g}" == f"{loss:.4g}"
    if step == 2:
        assert f"Best eval_loss: {loss:.4g}, at step 2, the last one: the saved model" in proc.stderr
    else:
        assert f"Best eval_loss: {loss:.4g}, at step 1: {out / 'checkpoint-1'} (kept" in proc.stderr and (out / "checkpoint-1").is_dir()
    assert "--val_size 3" in (out / "README.md").read_text()  # the card says how it was split
    both = run_cli("sft", "--data_path", os.path.join(DATA, "sft_example.json"), "--eval_data_path", os.path.join(DATA, "sft_example.json"),
                   "--val_size", "2", "--output_dir", str(tmp_path / "p"), check=False)
    assert both.returncode == 2 and "give it or --eval_data_path, not both" in both.stderr
