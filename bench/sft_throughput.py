"""SFT throughput, MFU and memory: qwen-tune against TRL's SFTTrainer at its best settings, on real Qwen shapes.

    python bench/sft_throughput.py                              # embedded model: every row, a few minutes
    python bench/sft_throughput.py --shape qwen2.5-0.5b         # Qwen2.5-0.5B's shape, random weights (CPU: ~30 min)
    python bench/sft_throughput.py --shape qwen3-0.6b --rows qwen-tune,trl-packed
    python bench/sft_throughput.py --shape qwen2.5-0.5b --device cuda   # bf16, sdpa; adds TRL + Liger rows

Every row trains the same generated chats (mostly short, some medium, a few long; a fixed seed) for one epoch,
in order, in a fresh process, from the same random-weight checkpoint (bench/shapes.py: the published
configuration, the real tokenizer and the checkpoint's official chat template), in fp32 on CPU (TRL's default
bf16 autocast falls back to a naive GEMM on CPUs without bf16 support) or bf16 on CUDA. The rows:

  qwen-tune         qwen-tune's default: each batch packed into one row, loss only on supervised tokens (chunked)
  qwen-tune-checkpointing   the same with --gradient_checkpointing True (against TRL's default memory)
  qwen-tune-padded  the same with --packing False (padded batches: what packing saves)
  qwen-tune-lora    the same with --use_lora True (r 64, alpha 16, all linear layers: qwen-tune's defaults)
  qwen-tune-qlora   the same with --q_lora True (bitsandbytes NF4 base)
  trl-packed        TRL SFTTrainer, packing=True, packing_strategy="bfd" (padding-free), assistant_only_loss=True
                    (TRL's training template for Qwen), its fused chunked LM head; one max_length block a step;
                    SFTConfig's default gradient_checkpointing=True (less memory, one more forward a step)
  trl-packed-no-checkpointing   the same with gradient_checkpointing=False (TRL's fastest)
  trl-reusing-memory   trl-packed-no-checkpointing with qwen-tune's glibc setting set in its process (not a TRL
                    option; qwen_tune/train/cpu_memory.py): how much of the gap is that setting, CPU only
  trl-padded        TRL SFTTrainer, dynamic padding, assistant_only_loss=True, same batch size as qwen-tune
  trl-padded-no-checkpointing   the same with gradient_checkpointing=False: TRL's fastest exact setting on a
                    hybrid (Gated DeltaNet) model without the fla kernels, where its packed rows are refused
  trl-lora-padded   trl-padded + the same LoraConfig as qwen-tune-lora (hybrid shapes on CPU)
  trl-liger         trl-packed + use_liger_kernel=True (CUDA only: Liger's kernels are Triton)
  trl-lora          trl-packed + the same PEFT LoraConfig as qwen-tune-lora
  trl-qlora         trl-lora on the same NF4 base as qwen-tune-qlora
  trl-defaults      reference: TRL SFTTrainer defaults (dynamic padding, loss on every token)
  pad-to-max        reference: the seed's way (pad every sample to model_max_length, full-logits loss); embedded only
                    by default (on a real shape it computes ~8x the tokens)

TRL rows load the checkpoint as a TRL user does (AutoModelForCausalLM; bitsandbytes NF4 for trl-qlora), without
anything of qwen-tune's. On a hybrid shape on CPU the packed TRL rows are left out by default: transformers' PyTorch
Gated DeltaNet refuses packed sequence boundaries without the fla kernels (a GPU package), so padding is TRL's
exact setting there. A shape marked LoRA-only (full fine-tuning would not fit this machine) runs adapter rows.

Real (non-pad) tokens/s is timed from the end of the first optimizer step to the end of the epoch (the first
step is warm-up). MFU = model FLOPs per real token (bench/flops.py: the same assistant-only job for every row)
x real tokens/s / the fastest of the model's own GEMMs measured in the same run. Peak memory: the process's peak
RSS (CPU) or torch.cuda.max_memory_allocated (CUDA). A second table measures the loss step alone (hidden states
and output projection -> loss -> backward) at 1k, 4k and 16k tokens, chunked against full logits.
The tables go into this shape's section of bench/results.md, with the command; the plot to bench/sft_<shape>.png.
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
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flops import flops_per_token, matmul_peak  # noqa: E402
from shapes import SHAPES, build_shape, config_of, is_hybrid, lora_only, parameter_counts  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "You are a helpful assistant."
ROWS = ("qwen-tune", "qwen-tune-checkpointing", "qwen-tune-padded", "qwen-tune-lora", "qwen-tune-qlora", "trl-packed",
        "trl-packed-no-checkpointing", "trl-reusing-memory", "trl-padded", "trl-padded-no-checkpointing", "trl-liger",
        "trl-lora", "trl-lora-padded", "trl-qlora", "trl-defaults", "pad-to-max")
TRL_PACKED = ("trl-packed", "trl-packed-no-checkpointing", "trl-reusing-memory", "trl-liger", "trl-lora", "trl-qlora")
TRL_NO_CHECKPOINTING = ("trl-packed-no-checkpointing", "trl-reusing-memory", "trl-padded-no-checkpointing")
PAIRS = (  # (qwen-tune row, TRL row, what they share): the summary under the table
    ("qwen-tune", "trl-packed-no-checkpointing", "defaults, no activation checkpointing on either side (TRL's fastest)"),
    ("qwen-tune-checkpointing", "trl-packed", "activation checkpointing on both sides (TRL's default)"),
    ("qwen-tune", "trl-padded-no-checkpointing", "defaults against TRL's fastest exact setting on a hybrid model "
     "without fla (padded, no checkpointing)"),
    ("qwen-tune-checkpointing", "trl-padded", "activation checkpointing on both sides, TRL padded"),
    ("qwen-tune-lora", "trl-lora-padded", "LoRA, the same LoraConfig, TRL padded"),
    ("qwen-tune", "qwen-tune-padded", "qwen-tune packed against qwen-tune padded"),
    ("qwen-tune", "trl-liger", "defaults against TRL with Liger's kernels"),
    ("qwen-tune-lora", "trl-lora", "LoRA, the same LoraConfig (TRL with its default checkpointing)"),
    ("qwen-tune-qlora", "trl-qlora", "Q-LoRA, the same NF4 base and LoraConfig (TRL with its default checkpointing)"),
    ("qwen-tune", "trl-reusing-memory", "with qwen-tune's allocator setting in TRL's process too (not a TRL option)"),
)
FLAGS = {
    "qwen-tune": "defaults (packing, chunked supervised-only loss)",
    "qwen-tune-checkpointing": "--gradient_checkpointing True (TRL's default: activations recomputed in backward)",
    "qwen-tune-padded": "--packing False",
    "qwen-tune-lora": "--use_lora True",
    "qwen-tune-qlora": "--use_lora True --q_lora True",
    "trl-packed": "packing=True, packing_strategy='bfd', assistant_only_loss=True (and SFTConfig's default gradient_checkpointing=True)",
    "trl-packed-no-checkpointing": "trl-packed with gradient_checkpointing=False",
    "trl-reusing-memory": "trl-packed-no-checkpointing in a process with qwen-tune's glibc setting (train/cpu_memory.py; not a TRL option)",
    "trl-padded": "assistant_only_loss=True (dynamic padding; gradient_checkpointing=True, SFTConfig's default)",
    "trl-padded-no-checkpointing": "trl-padded with gradient_checkpointing=False",
    "trl-lora-padded": "trl-padded + the LoraConfig of trl-lora",
    "trl-liger": "packing=True, packing_strategy='bfd', assistant_only_loss=True, use_liger_kernel=True",
    "trl-lora": "trl-packed + peft_config=LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules='all-linear')",
    "trl-qlora": "trl-lora on the NF4 base (BitsAndBytesConfig 4-bit, double quant)",
    "trl-defaults": "SFTConfig defaults (dynamic padding, loss on every token)",
    "pad-to-max": "qwen-tune --pad_to_max_length True with the full-logits loss (the seed's way)",
}
WORDS = ("the model learns to answer questions about data code and language with short clear sentences "
         "while keeping track of context across turns and explaining each step in plain words").split()


# ---------------------------------------------------------------- data
def text_of(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


def make_dataset(n: int, max_length: int, tokenizer) -> list[dict]:
    """Mostly short chats, every 5th medium, every 16th long (up to ~max_length tokens), fixed seed; never truncated."""
    rng = random.Random(0)
    convs = []
    for i in range(n):
        if i % 16 == 7:
            user, answer = rng.randint(300, 600), rng.randint(700, 1350)
        elif i % 5 == 2:
            user, answer = rng.randint(60, 200), rng.randint(200, 600)
        else:
            user, answer = rng.randint(8, 60), rng.randint(20, 200)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text_of(rng, user)},
                    {"role": "assistant", "content": text_of(rng, answer)}]
        while n_tokens(tokenizer, messages) > max_length - 8:
            longer = max(messages[1:], key=lambda m: len(m["content"]))
            longer["content"] = longer["content"][: int(len(longer["content"]) * 0.9)] + "."
        convs.append({"id": f"bench_{i}", "messages": messages})
    return convs


def n_tokens(tokenizer, messages) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


# ---------------------------------------------------------------- children (one row each, fresh process)
def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def step_timer(device: str):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """(time, real tokens seen) at the end of every optimizer step."""

        marks: list = []

        def on_step_end(self, args, state, control, **kw):
            import torch

            if device == "cuda":
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

    return StepTimer()


def child_train(row: str, a) -> dict:
    timer = step_timer(a.device)
    bf16 = a.device == "cuda"
    if row.startswith("trl"):
        train_trl(row, a, timer, bf16)
    else:
        train_qwen_tune(row, a, timer, bf16)
    (t0, tok0), (t1, tok1) = timer.marks[0], timer.marks[-1]
    return dict(steps=len(timer.marks), real_tokens=int(tok1 - tok0), seconds=t1 - t0, tokens_per_s=(tok1 - tok0) / (t1 - t0),
                all_real_tokens=int(tok1), peak_mb=peak_memory_mb(a.device))


def train_qwen_tune(row: str, a, timer, bf16: bool) -> None:
    from qwen_tune.methods import sft

    argv = ["--model_name_or_path", a.model, "--data_path", a.data, "--output_dir", a.tmp,
            "--model_max_length", str(a.max_length), "--per_device_train_batch_size", str(a.batch_size),
            "--num_train_epochs", "1", "--learning_rate", "1e-5", "--train_sampling_strategy", "sequential",
            "--save_strategy", "no", "--report_to", "none", "--bf16", str(bf16), "--tokens_cache", "none"]
    if row == "qwen-tune-checkpointing":
        argv += ["--gradient_checkpointing", "True"]
    if row == "qwen-tune-padded":
        argv += ["--packing", "False"]
    if row in ("qwen-tune-lora", "qwen-tune-qlora"):
        argv += ["--use_lora", "True"] + (["--q_lora", "True"] if row == "qwen-tune-qlora" else [])
    if row == "pad-to-max":
        argv += ["--pad_to_max_length", "True"]
        sft.causal_lm_loss_terms = plain_loss  # the seed's full-logits loss, in this benchmark process only
    sft.run(sft.load(sft.METHOD, argv), callbacks=(timer,))


def train_trl(row: str, a, timer, bf16: bool) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qwen_tune.models.lora import lora_config
    from qwen_tune.train.cpu_memory import reuse_freed_memory

    if row == "trl-reusing-memory":
        reuse_freed_memory()
    packed = row in TRL_PACKED
    options = dict(packing=True, packing_strategy="bfd", per_device_train_batch_size=1) if packed else \
        dict(per_device_train_batch_size=a.batch_size)
    config = SFTConfig(output_dir=a.tmp, max_length=a.max_length, num_train_epochs=1, learning_rate=1e-5,
                       train_sampling_strategy="sequential", save_strategy="no", report_to="none", logging_steps=1,
                       bf16=bf16, include_num_input_tokens_seen="non_padding", dataset_num_proc=1,
                       assistant_only_loss=row != "trl-defaults", use_liger_kernel=row == "trl-liger",
                       gradient_checkpointing=row not in TRL_NO_CHECKPOINTING, **options)
    convs = json.load(open(a.data))
    dataset = Dataset.from_list([{"messages": c["messages"]} for c in convs])
    dtype = torch.bfloat16 if bf16 else torch.float32
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, quantization_config=nf4 if row == "trl-qlora" else None)
    adapted = row in ("trl-lora", "trl-lora-padded", "trl-qlora")
    peft = lora_config(r=64, alpha=16, dropout=0.05, target_modules="all-linear") if adapted else None
    SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(a.model),
               peft_config=peft, callbacks=[timer]).train()


def plain_loss(model, batch: dict):
    """The seed's loss: fp32 logits at every position, then cross-entropy (what qwen-tune's chunked loss replaces);
    in the shape of `causal_lm_loss_terms`, which sft calls."""
    from qwen_tune.train.loss import LossTerms, plain_cross_entropy_sum

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    out = model(**inputs, use_cache=False)
    return LossTerms(*plain_cross_entropy_sum(out.logits, batch["labels"]), getattr(out, "aux_loss", None))


def child_loss(kind: str, a) -> dict:
    """One loss step alone on `a.tokens` positions, all supervised: the final hidden states and the output
    projection of the shape -> loss -> backward. Memory above what the inputs already hold."""
    import torch

    from qwen_tune.train.loss import chunked_cross_entropy_sum, plain_cross_entropy_sum

    config = config_of(a.shape)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    torch.manual_seed(0)
    hidden = torch.randn(1, a.tokens, config.hidden_size, dtype=dtype, device=a.device, requires_grad=True)
    weight = (torch.randn(config.vocab_size, config.hidden_size, dtype=dtype, device=a.device) * 0.02).requires_grad_()
    labels = torch.randint(0, config.vocab_size, (1, a.tokens), device=a.device)
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20  # resident now
    start = time.perf_counter()
    if kind == "chunked":
        loss, _ = chunked_cross_entropy_sum(hidden, weight, labels)
    else:
        loss, _ = plain_cross_entropy_sum((hidden @ weight.T), labels)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = peak_memory_mb(a.device)
    return dict(tokens=a.tokens, seconds=seconds, peak_mb=peak, above_base_mb=peak - base)


# ---------------------------------------------------------------- parent
def run_child(what: str, a, extra: list[str]) -> dict | str:
    """A row's result, or why it did not run (its error's last line)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", what, "--tmp", tmp, "--shape", a.shape,
               "--device", a.device, "--max_length", str(a.max_length), "--batch_size", str(a.batch_size)] + extra
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "Error" in line]
        print(f"{what} failed:\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
        if errors:
            return errors[-1][:200]
        return "killed (out of memory)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def default_rows(shape: str, device: str) -> list[str]:
    rows = [r for r in ROWS if r != ("trl-reusing-memory" if device == "cuda" else "trl-liger")]
    if shape != "embedded":
        rows.remove("pad-to-max")
    if is_hybrid(shape) and device == "cpu":  # TRL's packed rows need fla here; its exact rows are padded
        rows = [r for r in rows if r not in TRL_PACKED]
    else:
        rows = [r for r in rows if r not in ("trl-padded-no-checkpointing", "trl-lora-padded")]
    if lora_only(shape):
        rows = [r for r in rows if "lora" in r]
    return rows


def machine_mib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory / 2**20
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20


def logits_mib(tokens: int, vocab: int, device: str) -> float:
    """What a full-logits loss holds at once: the logits, their softmax and its gradient."""
    return 3 * tokens * vocab * (2 if device == "cuda" else 4) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="embedded", choices=sorted(SHAPES))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rows", default=None, help=f"comma-separated rows (default: all that apply); of {', '.join(ROWS)}")
    p.add_argument("--samples", type=int, default=48, help="chats trained, one epoch")
    p.add_argument("--batch_size", type=int, default=8, help="chats a step (rows that batch by sample)")
    p.add_argument("--max_length", type=int, default=2048, help="model_max_length; TRL's packed block length")
    p.add_argument("--loss_tokens", default="1024,4096,16384", help="the loss step table's lengths")
    p.add_argument("--scratch", default="/tmp/qwen_tune_bench", help="where the shape's checkpoint is written")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        result = child_loss(a.child[5:], a) if a.child.startswith("loss-") else child_train(a.child, a)
        print(json.dumps(result))
        return

    import torch
    from transformers import AutoTokenizer

    from qwen_tune.data.chat_format import resolve_format
    from qwen_tune.data.read import load_conversations

    model = str(build_shape(a.shape, Path(a.scratch) / a.shape))
    config = config_of(a.shape)
    tokenizer = AutoTokenizer.from_pretrained(model)
    convs = make_dataset(a.samples, a.max_length, tokenizer)
    data = os.path.join(tempfile.mkdtemp(prefix="qt-bench-"), "bench_sft.json")
    json.dump(convs, open(data, "w"))
    conversations = load_conversations(data)
    encoded = resolve_format(tokenizer).encode_many(conversations, [c.id for c in conversations], a.max_length)
    lengths, supervised = [len(e.input_ids) for e in encoded], [e.num_supervised for e in encoded]
    counts = parameter_counts(config)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    peak, gemm = matmul_peak(config, dtype, a.device)
    load = os.getloadavg()
    print(f"{a.shape}: {counts['blocks'] / 1e6:.0f}M block parameters; data {len(lengths)} chats, {sum(lengths)} tokens "
          f"({sum(supervised)} supervised); GEMM peak {peak / 1e9:.0f} GFLOP/s {gemm}; load {load[0]:.1f}", flush=True)

    fpt = {frozen: flops_per_token(counts, lengths, supervised, frozen) for frozen in (False, True)}
    results, losses = {}, {}

    def save() -> str:  # after every row: a long run cut short keeps what it measured
        section = render(a, config, counts, results, losses, lengths, supervised, fpt, peak, gemm, load)
        write_section(ROOT / "bench" / "results.md", a.shape, a.device, section)
        plot(results, losses, ROOT / "bench" / f"sft_{a.shape}{'_cuda' if a.device == 'cuda' else ''}.png", a.shape)
        return section

    for n in (int(t) for t in a.loss_tokens.split(",")):
        for kind in ("chunked", "plain"):
            need, total = logits_mib(n, config.vocab_size, a.device), machine_mib(a.device)
            losses[(kind, n)] = (f"not run: full logits need about {need / 1024:.0f} GiB, the machine has {total / 1024:.0f}"
                                 if kind == "plain" and need > 0.7 * total else run_child(f"loss-{kind}", a, ["--tokens", str(n)]))
            r = losses[(kind, n)]
            print(f"loss {kind} {n}: " + (f"{r['above_base_mb']:.0f} MiB above the inputs, {r['seconds']:.2f} s"
                                          if isinstance(r, dict) else r), flush=True)
    for row in (a.rows.split(",") if a.rows else default_rows(a.shape, a.device)):
        need = logits_mib(a.batch_size * a.max_length, config.vocab_size, a.device)
        if row == "pad-to-max" and need > 0.7 * machine_mib(a.device):
            results[row] = f"its full logits ({a.batch_size} x {a.max_length} positions) need about {need / 1024:.0f} GiB"
        else:
            results[row] = run_child(row, a, ["--data", data, "--model", model])
        r = results[row]
        print(f"{row}: " + (f"{r['tokens_per_s']:.1f} real tokens/s, peak {r['peak_mb']:.0f} MiB" if isinstance(r, dict) else r),
              flush=True)
        section = save()
    print(section)


def render(a, config, counts, results, losses, lengths, supervised, fpt, peak, gemm, load) -> str:
    import torch

    device = (torch.cuda.get_device_name() if a.device == "cuda"
              else f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})")
    ours = results.get("qwen-tune")
    command = " ".join(["python", "bench/sft_throughput.py"] + sys.argv[1:])
    lines = [
        f"## SFT on the {a.shape} shape ({a.device})", "",
        f"`{command}`", "",
        f"- device: {device}; load average at start {load[0]:.1f}; {'bf16' if a.device == 'cuda' else 'fp32'}",
        f"- model: {a.shape} ({counts['blocks'] / 1e6:.1f}M block parameters + {counts['vocab_projection'] / 1e6:.1f}M "
        f"vocabulary projection, {'tied' if config.tie_word_embeddings else 'untied'}; hidden {config.hidden_size}, "
        f"{config.num_hidden_layers} layers, {counts['layers']} of them full attention), random weights",
        f"- data: {len(lengths)} generated chats, one epoch, in order; {sum(lengths)} tokens, {sum(supervised)} supervised; "
        f"tokens min/median/max {min(lengths)}/{sorted(lengths)[len(lengths) // 2]}/{max(lengths)}; max_length {a.max_length}; "
        f"batch {a.batch_size} chats (TRL packed: one {a.max_length}-token block a step)",
        f"- GEMM peak measured in this run: {peak / 1e9:.1f} GFLOP/s ({gemm}); model FLOPs per real token "
        f"{fpt[False] / 1e9:.2f} G (full), {fpt[True] / 1e9:.2f} G (LoRA / Q-LoRA: frozen weights)", "",
        "| row | flags | real tokens/s | qwen-tune default vs this | MFU | peak memory (MiB) | steps | seconds timed |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row, r in results.items():
        if not isinstance(r, dict):
            lines.append(f"| {row} | {FLAGS[row]} | did not run: {r} | | | | | |")
            continue
        frozen = "lora" in row
        mfu = r["tokens_per_s"] * fpt[frozen] / peak
        ratio = f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}x" if isinstance(ours, dict) else "-"
        lines.append(f"| {row} | {FLAGS[row]} | {r['tokens_per_s']:.1f} | {ratio} | {100 * mfu:.1f}% | {r['peak_mb']:.0f} | "
                     f"{r['steps']} | {r['seconds']:.1f} |")
    pairs = [f"- {label}: {mine} against {theirs}: **{results[mine]['tokens_per_s'] / results[theirs]['tokens_per_s']:.2f}x** "
             f"real tokens/s, peak {results[mine]['peak_mb']:.0f} against {results[theirs]['peak_mb']:.0f} MiB"
             for mine, theirs, label in PAIRS if isinstance(results.get(mine), dict) and isinstance(results.get(theirs), dict)]
    if pairs:
        lines += ["", "Like for like:"] + pairs
    lines += ["", "### The loss step alone (all positions supervised)", "",
              "| tokens | chunked: memory above inputs (MiB) | chunked: seconds | full logits: memory above inputs (MiB) | "
              "full logits: seconds | chunked / full memory |", "|---:|---:|---:|---:|---:|---:|"]
    for n in sorted({n for _, n in losses}):
        c, f = losses[("chunked", n)], losses[("plain", n)]
        cells = [f"{c['above_base_mb']:.0f}", f"{c['seconds']:.2f}"] if isinstance(c, dict) else [c, ""]
        cells += [f"{f['above_base_mb']:.0f}", f"{f['seconds']:.2f}"] if isinstance(f, dict) else [f, ""]
        ratio = (f"{c['above_base_mb'] / f['above_base_mb']:.2f}x" if isinstance(c, dict) and isinstance(f, dict) else
                 f"{c['above_base_mb'] / logits_mib(n, config.vocab_size, a.device):.2f}x of the estimate" if isinstance(c, dict) else "")
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, shape: str, device: str, section: str) -> None:
    """Replace this shape's section of results.md (between its markers), or add it; other sections stay."""
    start, end = f"<!-- sft_throughput {shape} {device} -->", f"<!-- end sft_throughput {shape} {device} -->"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    block = f"{start}\n{section}{end}\n"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text, encoding="utf-8")


def plot(results, losses, path: Path, shape: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = {k: r for k, r in results.items() if isinstance(r, dict)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    colors = ["#e07b39" if k.startswith("qwen-tune") else "#6a9fd8" if k.startswith("trl") else "#999999" for k in ran]
    bars = left.barh(list(ran), [r["tokens_per_s"] for r in ran.values()], color=colors)
    left.bar_label(bars, labels=[f"{r['tokens_per_s']:.0f}" for r in ran.values()])
    left.invert_yaxis()
    left.set_xlabel("real (non-pad) tokens / s")
    left.set_title(f"SFT throughput, {shape}, same data")
    for kind, style in (("chunked", "o-"), ("plain", "s--")):
        points = sorted((n, r["above_base_mb"]) for (k, n), r in losses.items() if k == kind and isinstance(r, dict))
        if points:
            right.plot([n for n, _ in points], [m / 1024 for _, m in points], style,
                       label="chunked (qwen-tune)" if kind == "chunked" else "full logits")
    right.set_xscale("log", base=2)
    right.set_xlabel("tokens in the step")
    right.set_ylabel("GiB above the inputs")
    right.set_title("loss step memory")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
