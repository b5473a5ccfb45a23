"""SFT throughput and memory: qwen-tune's default vs the seed's pad-to-max vs TRL's SFTTrainer.

    python bench/sft_throughput.py                    # embedded model, CPU, a few minutes
    python bench/sft_throughput.py --model /path/to/Qwen2.5-0.5B-Instruct --steps 20 --batch_size 8

One deterministic data set with a realistic length spread (mostly short chats, some medium, a few
up to ~2,000 tokens), the same samples in the same order (sequential sampler), the same model and
number of steps for every configuration, each in a fresh subprocess:
  pad-to-max  qwen-tune --pad_to_max_length True with the plain full-logits loss (the seed's way)
  trl         TRL SFTTrainer, its defaults (dynamic padding, full-logits loss on all tokens), fp32
  qwen-tune   qwen-tune's default: padding-free packing + chunked supervised-only loss
Real (non-pad) tokens/s is timed from the end of the first step to the end of the last (the first
step is warm-up); peak memory is the child's peak RSS (CPU) or torch.cuda.max_memory_allocated (GPU).
A second table measures one loss step (forward + backward) on a 2,048-token row: chunked vs plain.
Writes bench/results.md and bench/throughput.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = "You are a helpful assistant."
CONFIGS = {
    "pad-to-max": "seed-style: pad every sample to model_max_length, full-logits loss",
    "trl": "TRL SFTTrainer defaults (dynamic padding, full-logits loss)",
    "qwen-tune": "qwen-tune default: packing + chunked supervised-only loss",
}
WORDS = ("the model learns to answer questions about data code and language with short clear sentences "
         "while keeping track of context across turns and explaining each step in plain words").split()


# ---------------------------------------------------------------- data
def text_of(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


def make_dataset(n: int, max_length: int, tokenizer) -> list[dict]:
    """Mostly short chats, every 5th medium, every 16th long (up to ~max_length tokens), fixed seed."""
    rng = random.Random(0)
    convs = []
    for i in range(n):
        if i % 16 == 7:
            user, answer = rng.randint(300, 600), rng.randint(700, 1350)
        elif i % 5 == 2:
            user, answer = rng.randint(60, 200), rng.randint(200, 600)
        else:
            user, answer = rng.randint(8, 60), rng.randint(20, 200)
        turns = [{"from": "user", "value": text_of(rng, user)}, {"from": "assistant", "value": text_of(rng, answer)}]
        while n_tokens(tokenizer, turns) > max_length - 8:  # never truncated, by either trainer
            longer = max(turns, key=lambda t: len(t["value"]))
            longer["value"] = longer["value"][: int(len(longer["value"]) * 0.9)] + "."
        convs.append({"id": f"bench_{i}", "conversations": turns})
    return convs


def n_tokens(tokenizer, turns) -> int:
    messages = [{"role": "system", "content": SYSTEM}] + [{"role": t["from"], "content": t["value"]} for t in turns]
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


# ---------------------------------------------------------------- children (one config each)
def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """(time, real tokens seen) at the end of every optimizer step."""

        marks: list = []

        def on_step_end(self, args, state, control, **kw):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

    return StepTimer()


def child_train(cfg: str, a) -> dict:
    timer = step_timer()
    common = dict(steps=a.steps, batch=a.batch_size)
    if cfg == "trl":
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        from qwen_tune.model import resolve_model_path

        path = resolve_model_path(a.model)
        convs = json.load(open(a.data))
        ds = Dataset.from_list([{"messages": [{"role": "system", "content": SYSTEM}]
                                 + [{"role": t["from"], "content": t["value"]} for t in c["conversations"]]} for c in convs])
        config = SFTConfig(output_dir=a.tmp, max_length=a.max_length, per_device_train_batch_size=a.batch_size,
                           max_steps=a.steps, learning_rate=1e-4, train_sampling_strategy="sequential",
                           save_strategy="no", report_to="none", logging_steps=1, bf16=a.bf16,
                           include_num_input_tokens_seen="non_padding")
        model = AutoModelForCausalLM.from_pretrained(path, dtype="bfloat16" if a.bf16 else "float32")
        trainer = SFTTrainer(model=model, args=config, train_dataset=ds,
                             processing_class=AutoTokenizer.from_pretrained(path), callbacks=[timer])
        trainer.train()
    else:
        from qwen_tune import sft

        argv = ["--data_path", a.data, "--output_dir", a.tmp, "--model_max_length", str(a.max_length),
                "--per_device_train_batch_size", str(a.batch_size), "--max_steps", str(a.steps),
                "--learning_rate", "1e-4", "--train_sampling_strategy", "sequential", "--save_strategy", "no",
                "--report_to", "none", "--system_message", SYSTEM, "--bf16", str(a.bf16)]
        if a.model:
            argv += ["--model_name_or_path", a.model]
        if cfg == "pad-to-max":
            argv += ["--pad_to_max_length", "True"]
            sft.causal_lm_loss_sum = plain_loss  # the seed's full-logits loss, in this benchmark process only
        sft.run(*sft.parse(sft.ARGUMENTS, argv), callbacks=(timer,))
    (t0, tok0), (t1, tok1) = timer.marks[0], timer.marks[-1]
    return dict(common, real_tokens=int(tok1 - tok0), seconds=t1 - t0, tokens_per_s=(tok1 - tok0) / (t1 - t0),
                all_real_tokens=int(tok1), peak_mb=peak_memory_mb())


def child_loss(kind: str, a) -> dict:
    """One forward+backward of the loss on a 2,048-token packed row of real samples."""
    import torch

    from qwen_tune.data.collate import PackedCollator
    from qwen_tune.data.chat_format import resolve_format
    from qwen_tune.data.dataset import load_sft_dataset
    from qwen_tune.train.loss import causal_lm_loss_sum
    from qwen_tune.model import load_model, resolve_model_path
    from qwen_tune.tokenizer import load_tokenizer

    path = resolve_model_path(a.model)
    samples, _ = load_sft_dataset(a.data, resolve_format(load_tokenizer(path), system_message=SYSTEM), a.max_length)
    row, used = [], 0
    for s in samples:
        if used + len(s.input_ids) > a.max_length:
            continue
        row.append({"input_ids": s.input_ids, "labels": s.labels})
        used += len(s.input_ids)
    batch = PackedCollator()(row)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(path, dtype=torch.bfloat16 if a.bf16 else torch.float32).to(device)
    model.config.use_cache = False
    batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20  # resident now
    start = time.perf_counter()
    loss, n = (plain_loss if kind == "plain" else causal_lm_loss_sum)(model, batch)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = peak_memory_mb()
    return dict(tokens=used, supervised=n, loss=loss.item(), seconds=seconds, peak_mb=peak, above_base_mb=peak - base)


def plain_loss(model, batch: dict):
    """The seed's loss: fp32 logits at every position, then cross-entropy (what qwen-tune's chunked loss replaces)."""
    from qwen_tune.train.loss import plain_cross_entropy_sum

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    return plain_cross_entropy_sum(model(**inputs, use_cache=False).logits, batch["labels"])


# ---------------------------------------------------------------- parent
def run_child(what: str, a, data: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", what, "--data", data, "--tmp", tmp,
               "--steps", str(a.steps), "--batch_size", str(a.batch_size), "--max_length", str(a.max_length),
               "--bf16", str(a.bf16)] + (["--model", a.model] if a.model else [])
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=ROOT)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{what} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="local checkpoint (default: the embedded tiny Qwen2)")
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--max_length", type=int, default=2048)
    p.add_argument("--bf16", type=lambda s: s.lower() == "true", default=False)
    p.add_argument("--out", default=os.path.join(ROOT, "bench"))
    p.add_argument("--only", default=None, help="comma-separated configs to run (default: all)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        result = child_loss(a.child[5:], a) if a.child.startswith("loss-") else child_train(a.child, a)
        print(json.dumps(result))
        return

    from qwen_tune.model import resolve_model_path
    from qwen_tune.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_model_path(a.model))
    convs = make_dataset(a.samples, a.max_length, tokenizer)
    lengths = sorted(n_tokens(tokenizer, c["conversations"]) for c in convs)
    window = [n_tokens(tokenizer, c["conversations"]) for c in convs[: a.steps * a.batch_size]]
    data = os.path.join(tempfile.mkdtemp(prefix="qt-bench-"), "bench_sft.json")
    json.dump(convs, open(data, "w"))
    load = os.getloadavg()
    print(f"data: {len(convs)} samples, tokens min/median/max {lengths[0]}/{lengths[len(lengths) // 2]}/{lengths[-1]}; "
          f"the {len(window)} trained samples: {sum(window)} tokens, max {max(window)}; load average {load[0]:.1f}", flush=True)

    results = {}
    for cfg in (a.only.split(",") if a.only else CONFIGS):
        results[cfg] = run_child(cfg, a, data)
        print(f"{cfg}: {results[cfg]['tokens_per_s']:.0f} real tokens/s, peak {results[cfg]['peak_mb']:.0f} MiB", flush=True)
    losses = {k: run_child(f"loss-{k}", a, data) for k in ("chunked", "plain")}
    for k, r in losses.items():
        print(f"loss step {k}: {r['above_base_mb']:.0f} MiB above resting, {r['seconds']:.1f} s", flush=True)
    report = render(a, results, losses, lengths, window, load)
    print(report)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(report)
    plot(results, os.path.join(a.out, "throughput.png"))


def render(a, results, losses, lengths, window, load) -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})"
    ours = results.get("qwen-tune", {}).get("tokens_per_s")
    lines = [
        "# SFT throughput: qwen-tune vs pad-to-max vs TRL SFTTrainer", "",
        f"`python bench/sft_throughput.py {' '.join(sys.argv[1:])}`".replace("  ", " "), "",
        f"- device: {device}; load average at start {load[0]:.1f} (shared machine: timings are noisy)",
        f"- model: {a.model or 'embedded tiny Qwen2 (151,936 vocabulary, hidden 64, 2 layers)'}; "
        f"{'bf16' if a.bf16 else 'fp32'}; model_max_length {a.max_length}",
        f"- data: {len(lengths)} generated chats, tokens min/median/max {lengths[0]}/{lengths[len(lengths) // 2]}/{lengths[-1]}; "
        f"each run trains the same first {len(window)} samples in order ({a.steps} steps x batch {a.batch_size}, "
        f"{sum(window)} real tokens, longest {max(window)}); timed from step 1's end to step {a.steps}'s end", "",
        "| configuration | real tokens/s | qwen-tune speed-up | peak memory (MiB) | real tokens timed | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for cfg, r in results.items():
        ratio = f"{ours / r['tokens_per_s']:.2f}x" if ours else "-"
        lines.append(f"| {cfg}: {CONFIGS[cfg]} | {r['tokens_per_s']:.0f} | {ratio} | {r['peak_mb']:.0f} | {r['real_tokens']} | {r['seconds']:.1f} |")
    c, pl = losses["chunked"], losses["plain"]
    lines += [
        "", f"## One loss step (forward + backward) on a {c['tokens']}-token packed row ({c['supervised']} supervised tokens)", "",
        "| loss | memory above resting (MiB) | peak (MiB) | seconds | loss sum |", "|---|---:|---:|---:|---:|",
        f"| chunked supervised-only (qwen-tune) | {c['above_base_mb']:.0f} | {c['peak_mb']:.0f} | {c['seconds']:.2f} | {c['loss']:.2f} |",
        f"| plain full logits | {pl['above_base_mb']:.0f} | {pl['peak_mb']:.0f} | {pl['seconds']:.2f} | {pl['loss']:.2f} |",
        "", f"Plain / chunked memory above resting: **{pl['above_base_mb'] / max(c['above_base_mb'], 1):.1f}x**; "
        f"peak: {pl['peak_mb'] / c['peak_mb']:.2f}x. (CPU: peak RSS of a fresh process minus its resident size before the step.)", "",
    ]
    return "\n".join(lines)


def plot(results, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    values = [results[n]["tokens_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(names, values, color=["#999999", "#6a9fd8", "#e07b39"][: len(names)])
    ax.bar_label(bars, labels=[f"{v:.0f}" for v in values])
    ax.set_ylabel("real (non-pad) tokens / s")
    ax.set_title("SFT throughput, same data and steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
