"""Running qwen-tune as a user does: in a fresh process, offline, with no remote code (see tests/forkserver.py)."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")


class Forkserver:
    """The test process's zygote (tests/forkserver.py), started on first use and stopped at exit: `python` and
    `qwen-tune` on the PATH of `fresh_env()` are its clients, so a fresh process costs no library imports."""

    directory: str | None = None
    proc: subprocess.Popen | None = None
    env: dict | None = None

    @classmethod
    def environment(cls) -> dict:
        """A user's shell for every fresh process of this test run: this process's environment when first asked,
        offline, with the clients first on PATH (and as torchrun's PYTHON_EXEC). Taken once: what this process
        changes later (variables its own imports or in-process runs set) is not the user's, and would also make
        the zygote, which serves only that environment, decline every client."""
        if cls.env is None:
            import atexit

            from forkserver import write_clients

            env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
            env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
            cls.directory = tempfile.mkdtemp(prefix="qwen-tune-forkserver-")
            bin_dir, socket_path = os.path.join(cls.directory, "bin"), os.path.join(cls.directory, "socket")
            write_clients(bin_dir)
            env.update(PATH=bin_dir + os.pathsep + env.get("PATH", ""), PYTHON_EXEC=os.path.join(bin_dir, "python"),
                       QWEN_TUNE_TEST_FORKSERVER=socket_path)
            # its stdin is a pipe from this process: when this process ends, however it ends, the zygote does too
            cls.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "forkserver.py"), socket_path], cwd=ROOT,
                                        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            atexit.register(cls.stop)
            ready = False
            while not ready and select.select([cls.proc.stdout], [], [], 300)[0]:
                line = cls.proc.stdout.readline()  # libraries may print while they are imported
                ready = line.strip() == "ready"
                if not line:
                    break
            if not ready:  # the clients then run real interpreters: slower, never wrong
                cls.proc.kill()
                env.pop("QWEN_TUNE_TEST_FORKSERVER")
            cls.env = env
        return dict(cls.env)

    @classmethod
    def stop(cls) -> None:
        cls.proc.kill()
        cls.proc.wait()
        shutil.rmtree(cls.directory, ignore_errors=True)


# A variable nothing reads: given to fresh_env / run_cli, it makes `python` and `qwen-tune` run a real interpreter,
# for tests of what happens while libraries are imported (their messages, import time).
REAL_INTERPRETER = {"QWEN_TUNE_TEST_REAL_INTERPRETER": "1"}


# What libraries print that tells a user nothing (qwen_tune/quiet.py silences each; colour codes are those of
# transformers' load report): none may reach a command's output. Progress bars (tqdm's cursor moves) are not noise.
LIBRARY_NOISE = re.compile(r"\w+Warning\b|warnings\.warn|LOAD REPORT|\x1b\[[0-9;]*m|There were missing keys|gemm_4bit_forward|is deprecated")


def library_noise(output: str) -> list[str]:
    """The lines of a command's output that are library noise."""
    return [line for line in output.splitlines() if LIBRARY_NOISE.search(line)]


def fresh_env(**extra) -> dict:
    """The environment of a user's shell, offline; `python` and `qwen-tune` are the forkserver's clients. Any extra
    variable makes them run a real interpreter (libraries read some variables at import)."""
    return dict(Forkserver.environment(), **extra)


def free_port() -> str:
    """A TCP port the OS has just handed out, for a launcher's MASTER_PORT. Not a random number: in-process training
    seeds Python's `random` (set_seed), so two workers drew the same "random" port and one launch failed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_python(argv: list[str], code: str | None = None, cwd: str = ROOT, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    """`python -m qwen_tune ARGV` (or `python -c CODE ARGV`) in a fresh process, offline, with no remote code."""
    command = ["python", *(["-c", code] if code is not None else ["-m", "qwen_tune"]), *argv]
    return subprocess.run(command, cwd=cwd, env=fresh_env(**env), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def run_cli(*args: str, check: bool = True, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    """`qwen-tune ARGS` in a fresh process; returns the completed process (text output)."""
    proc = run_python(list(args), timeout=timeout, **env)
    if check and proc.returncode != 0:
        raise AssertionError(f"qwen-tune {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


GENERATE = r"""
import json, sys
from transformers import AutoTokenizer
out, kind, messages = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if kind == "adapter":
    from peft import AutoPeftModelForCausalLM as Model
elif kind == "vision-language":
    from transformers import AutoModelForImageTextToText as Model
else:
    from transformers import AutoModelForCausalLM as Model
model = Model.from_pretrained(out).eval()
tok = AutoTokenizer.from_pretrained(out)
answers = []
for conv in messages:
    ids = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, max_new_tokens=48, do_sample=False)
    answers.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
print(json.dumps(answers))
"""


def generate_in_fresh_process(out: str, conversations: list[list[dict]], adapter: bool, vision_language: bool = False) -> list[str]:
    """Reload `out` in a new offline Python (no trust_remote_code) and greedily answer each conversation."""
    kind = "adapter" if adapter else "vision-language" if vision_language else "full"
    proc = run_python([out, kind, json.dumps(conversations)], code=GENERATE, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


SAMPLE = r"""
import json, sys, torch
from transformers import AutoTokenizer
out, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "adapter":
    from peft import AutoPeftModelForCausalLM as Model
else:
    from transformers import AutoModelForCausalLM as Model
torch.manual_seed(0)
model = Model.from_pretrained(out).eval()
tok = AutoTokenizer.from_pretrained(out)
ids = tok.apply_chat_template(json.loads(sys.argv[4]), add_generation_prompt=True, return_tensors="pt", return_dict=True)
gen = model.generate(**ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=16, num_return_sequences=n)
print(json.dumps(tok.batch_decode(gen[:, ids["input_ids"].shape[1]:], skip_special_tokens=True)))
"""


def sample_in_fresh_process(prompt: list[dict], out: str, n: int, adapter: bool = False) -> list[str]:
    """Reload `out` offline in a new Python and sample n replies to `prompt` at temperature 1, rendered with
    the chat template saved with the model."""
    proc = run_python([out, "adapter" if adapter else "full", str(n), json.dumps(prompt)], code=SAMPLE, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train_tiny_reward_model(base_model_path: str, tokenizer, prompt: list[dict], preferred: str, others: list[str],
                            out: str) -> str:
    """A tiny Bradley-Terry reward model (the embedded model + a score head) preferring one reply over the others,
    each scored at the closing <|im_end|> of prompt + reply, as rm, score, ppo and grpo do. Replies must have
    the same number of tokens (no padding)."""
    import copy

    import torch
    from transformers import AutoModelForSequenceClassification

    from qwen_tune.data.chat_format import resolve_format
    from qwen_tune.models.tokenizer import save_tokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base_model_path, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    fmt = resolve_format(copy.copy(tokenizer))
    batch = torch.tensor([sum(fmt.reply_ids(prompt, [{"role": "assistant", "content": a}]), []) for a in [preferred, *others]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(30):
        r = model(input_ids=batch).logits[:, 0]
        loss = -torch.nn.functional.logsigmoid(r[0] - r[1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    return out


SEED_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


def first_replies(path: str) -> tuple[list[list[dict]], list[str]]:
    """Each conversation up to its first assistant turn, and that turn's text."""
    prompts, replies = [], []
    for conversation in json.load(open(path, encoding="utf-8")):
        messages = []
        for turn in conversation["conversations"]:
            if turn["from"] == "assistant":
                prompts.append(messages)
                replies.append(turn["value"])
                break
            messages.append({"role": SEED_ROLES[turn["from"]], "content": turn["value"]})
    return prompts, replies


def assert_finished_sft_output(out: str, adapter: bool) -> None:
    """What every finished sft output holds: qwen-tune's card, metrics of a loss that fell, the weights (or the adapter,
    whose base is recorded as an absolute path that exists), no pickles."""
    assert_qwen_tune_card(out)  # an adapter's too: PEFT's save writes its placeholder README.md
    metrics = json.load(open(os.path.join(out, "train_metrics.json")))
    # the loss fell well below its start (ln 151936 = 11.9 for a uniform guess)
    assert metrics["train_loss_final"] < metrics["train_loss"] < 11.9
    assert metrics["train_real_tokens_per_second"] > 0
    files = set(os.listdir(out))
    assert ("adapter_model.safetensors" in files) == adapter and ("model.safetensors" in files) == (not adapter)
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)  # no pickles in the result
    if adapter:
        base = json.load(open(os.path.join(out, "adapter_config.json")))["base_model_name_or_path"]
        assert os.path.isabs(base) and os.path.exists(os.path.join(base, "config.json"))


def assert_answers_as_trained(out: str, adapter: bool) -> None:
    prompts, wanted = first_replies(os.path.join(DATA, "sft_example.json"))
    got = generate_in_fresh_process(out, prompts, adapter=adapter)
    same = [g.strip()[:20] == w[:20] for g, w in zip(got, wanted)]
    # all 12 on this machine; a greedy answer may flip on another CPU's rounding
    assert sum(same) >= 10, "\n".join(f"{'OK' if s else '--'} {g[:60]!r}" for s, g in zip(same, got))


def logprob_margins(model, tokenizer, data: str):
    """Per pair: sum log p(chosen reply | prompt) - sum log p(rejected reply | prompt), on the tokens dpo trains on."""
    import copy

    import torch

    from qwen_tune.data.chat_format import resolve_format
    from qwen_tune.data.pairs import encode_pairs

    pairs, _ = encode_pairs(data, resolve_format(copy.copy(tokenizer), system_message=""), 512, split_prompt=True)

    def logp(prompt, reply):
        ids = torch.tensor([prompt + reply])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
        return logits.log_softmax(-1).gather(1, ids[0, len(prompt):, None]).sum().item()

    return torch.tensor([logp(p["prompt_ids"], p["chosen_ids"]) - logp(p["prompt_ids"], p["rejected_ids"]) for p in pairs])


def assert_qwen_tune_card(out) -> str:
    """OUT/README.md is qwen-tune's model card, not the placeholder PEFT or TRL write there, and no MODEL_CARD.md was
    needed beside it (that is only for a README.md the user had put in OUT before the run). Returns the card."""
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "tags: [qwen-tune" in card and "## Hyper-parameters" in card, card[:500]
    assert "[More Information Needed]" not in card and "generated_from_trainer" not in card, card[:500]
    assert not os.path.exists(os.path.join(out, "MODEL_CARD.md"))
    return card


def save_random_teacher(path) -> str:
    """A model of the embedded model's shape with other random weights (seed 1) and the same tokenizer: a teacher for
    `qwen-tune distill` whose divergence from the embedded student is not zero."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qwen_tune.models.model import embedded_model_path
    from qwen_tune.models.tokenizer import load_tokenizer, save_tokenizer

    base = embedded_model_path()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)).save_pretrained(path)
    save_tokenizer(load_tokenizer(base), path)
    return str(path)
