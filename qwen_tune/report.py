"""Seeing a run: progress, the loss plot and the model card in the output directory.

`report_callbacks(args)` are added to every Trainer (the plot is redrawn at each checkpoint save, so a
long run can be watched and a crashed one still has its curve); `write_run_report(output_dir, **info)`
runs at the end and writes `README.md` (the model card), `loss.png` and `loss.json` (the plotted data).
The HF progress bar already shows the ETA; `RunProgress` adds the recent tokens/s to every log line, and
`ProgressLines` prints each as plain numbers.
TensorBoard event files come from transformers' own callback (`report_to` defaults to tensorboard).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from .console import say
from .models.trained import loading_code

PLOT, PLOT_DATA, CARD = "loss.png", "loss.json", "README.md"


# ---------------------------------------------------------------- callbacks


class RunProgress(TrainerCallback):
    """Adds `tokens_per_second` (real tokens since the previous log line) to each log, next to loss and lr."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or not state.num_input_tokens_seen:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        then, before = getattr(self, "last", (now, tokens))
        if now > then:
            logs["tokens_per_second"] = round((tokens - before) / (now - then), 1)
        self.last = (now, tokens)


class JsonlLog(TrainerCallback):
    """Every log line (loss, rewards per function, KL, lengths, ...) appended to OUTPUT_DIR/`name` as it is logged,
    with the step, the run's total steps and the time, so a running or crashed run can be watched with any tool
    (`qwen-tune ui` does). Each start, fresh or resumed, first writes a `begin` record with the command (`argv`);
    the records after it replace those of later steps from before (lost to the resume)."""

    def __init__(self, name: str = "train_log.jsonl"):
        self.name = name

    def on_train_begin(self, args, state, control, **kwargs):
        self._write(args, state, {"event": "begin", "argv": sys.argv})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self._write(args, state, logs)

    def _write(self, args, state, record: dict) -> None:
        if state.is_world_process_zero:
            with open(os.path.join(args.output_dir, self.name), "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, "max_steps": state.max_steps, "time": round(time.time(), 3),
                                    **record}) + "\n")


class OwnModelCard:
    """For TRL's trainers: they write their model card to OUTPUT_DIR/README.md at every checkpoint, over a user's
    README.md. qwen-tune writes its own card once, at the end (`write_run_report`), and keeps the user's file."""

    def create_model_card(self, *args, **kwargs) -> None:
        return None


class PlotOnSave(TrainerCallback):
    """Redraw `loss.png` in the output directory whenever a checkpoint is saved."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_losses(state.log_history, os.path.join(args.output_dir, PLOT))


_TB_ENV = "TENSORBOARD_LOGGING_DIR"
_tb_dir_we_set: str | None = None


def tensorboard_dir(args) -> str | None:
    """Send TensorBoard events to OUTPUT_DIR/runs.

    transformers 5 dropped `logging_dir`; its TensorBoard callback reads $TENSORBOARD_LOGGING_DIR when it is
    built and otherwise writes to ./runs of whatever directory the user started in. A value the user set wins.
    """
    global _tb_dir_we_set
    if "tensorboard" not in (args.report_to or []):
        return None
    if os.environ.get(_TB_ENV) and os.environ[_TB_ENV] != _tb_dir_we_set:
        return os.environ[_TB_ENV]
    _tb_dir_we_set = os.environ[_TB_ENV] = os.path.join(os.path.abspath(args.output_dir), "runs")
    return _tb_dir_we_set


class ProgressLines(ProgressCallback):
    """The Trainer's progress bar (ETA, on stderr), with each log written as one line of numbers on stdout:
    `step 3/30  loss 11.17  grad_norm 10.84  learning_rate 0.005  epoch 1  tokens_per_second 218.4`;
    an evaluation as a line of its own, during training and after it (the bar is closed by then):
    `eval at step 10/30: loss 2.113  perplexity 8.274`, `eval of the final model (step 30): loss 1.9  perplexity 6.686`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if any(k.startswith("eval_") for k in logs):
            when = f"at step {state.global_step}/{state.max_steps}" if self.training_bar is not None else \
                f"of the final model (step {state.global_step})"
            say(f"eval {when}: {eval_values(logs)}", file=sys.stdout)
        elif self.training_bar is not None:
            values = "  ".join(f"{k} {_fmt(v)}" for k, v in logs.items() if k != "total_flos")
            say(f"step {state.global_step}/{state.max_steps}  {values}", file=sys.stdout)


def eval_values(logs: dict) -> str:
    """An evaluation's results without the `eval_` prefix and without its timing."""
    timing = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
    return "  ".join(f"{k.removeprefix('eval_')} {_fmt(v)}" for k, v in logs.items() if k.startswith("eval_") and k not in timing)


def show_progress_as_lines(trainer) -> None:
    """Swap the Trainer's own progress callback (which prints each log as a dict of quoted strings) for `ProgressLines`."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ProgressLines())


def report_callbacks(args, log: str = "train_log.jsonl") -> list:
    """Called before the Trainer is built (so the TensorBoard directory is set in time). `log`: the JSON-lines log."""
    tensorboard_dir(args)
    return [RunProgress(), PlotOnSave(), JsonlLog(log)]


# ---------------------------------------------------------------- the loss plot

# panel title -> predicate on a logged key. Trainer logs use loss/eval_loss; PPO's ppo_log.jsonl reward/kl keys.
PANELS = {
    "loss": lambda k: k in ("loss", "eval_loss"),
    "reward": lambda k: "reward" in k and not k.endswith(("_std", "/std", "runtime")),
    "KL": lambda k: k == "kl" or k.startswith("kl") or k.endswith("_kl") or "/kl" in k,
}


def read_records(source) -> list[dict]:
    """Log records from a list (Trainer `log_history`), a `.jsonl` file (PPO's ppo_log.jsonl) or trainer_state.json."""
    if not isinstance(source, (str, os.PathLike)):
        return list(source)
    text = Path(source).read_text(encoding="utf-8")
    if str(source).endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    return data["log_history"] if isinstance(data, dict) else data


def loss_series(records: list[dict]) -> dict[str, list[list[float]]]:
    """{key: [[step, value], ...]} for every plotted key (train loss, eval loss, rewards, KL)."""
    series: dict[str, list[list[float]]] = {}
    for i, r in enumerate(records):
        step = r.get("step", r.get("global_step", i + 1))
        for key, value in r.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and any(p(key) for p in PANELS.values()):
                series.setdefault(key, []).append([step, float(value)])
    return series


def plot_losses(source, path: str) -> dict[str, list[list[float]]]:
    """Draw train/eval loss (and reward, KL for PPO) against the step; save `path` and its data next to it."""
    series = loss_series(read_records(source))
    if not series:
        return series
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    panels = [(title, [k for k in series if pred(k)]) for title, pred in PANELS.items()]
    panels = [(t, keys) for t, keys in panels if keys]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3 * len(panels)), squeeze=False, sharex=True)
    for ax, (title, keys) in zip(axes[:, 0], panels):
        for key in keys:
            steps, values = zip(*series[key])
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3,
                    label={"loss": "train loss", "eval_loss": "eval loss"}.get(key, key))
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    Path(path).with_suffix(".json").write_text(json.dumps(series), encoding="utf-8")
    return series


# ---------------------------------------------------------------- the model card


def command_line(argv: list[str] | None = None) -> str:
    """The command as the user would type it again (`python -m qwen_tune` shown as `qwen-tune`)."""
    argv = list(sys.argv if argv is None else argv)
    head = os.path.basename(argv[0])
    prog = {"__main__.py": "qwen-tune", "qwen-tune": "qwen-tune"}.get(head, f"python {argv[0]}")
    return prog + (" " + shlex.join(argv[1:]) if argv[1:] else "")


def file_facts(path: Path) -> tuple[int, str]:
    """(number of samples, sha256) of a data file in any format (a table's rows; a JSON list's items, ...).
    The hash is of the file's bytes; for a `save_to_disk` directory, of each file's relative name and bytes, in sorted order."""
    from .data.files import count_records
    from .data.hub import HubDataset

    digest = hashlib.sha256()
    if isinstance(path, HubDataset):  # a cached dataset: its Arrow files
        files = path.data_files()
    else:
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for f in files:
        if isinstance(path, Path) and path.is_dir():
            digest.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return count_records(path), digest.hexdigest()


def _data_section(data_files: dict, data_reports: dict) -> list[str]:
    from .data.files import is_tokens_dir
    from .data.files import resolve_sources

    lines = ["| split | file | samples | sha256 |", "|---|---|---|---|"]
    for split, paths in data_files.items():
        if not paths:
            continue
        if is_tokens_dir(paths):  # `preprocess --out DIR`: the data files it was made from are in its tokens.json
            marker = json.loads(Path(paths, "complete.json").read_text(encoding="utf-8"))
            lines.append(f"| {split} | `{Path(paths).resolve()}` (tokens) | {marker['rows']} | `xxh3_128 {marker['xxh3_128']}` |")
            continue
        for source in resolve_sources(paths):
            weight = f" (weight {float(source.weight):g})" if source.weight is not None else ""
            for f in source.files:
                count, digest = file_facts(f)
                shown = f.resolve() if isinstance(f, Path) else f"{f} (Hugging Face cache)"
                lines.append(f"| {split} | `{shown}`{weight} | {count} | `{digest}` |")
    for split, rep in (data_reports or {}).items():
        summary = rep.summary(split) if hasattr(rep, "summary") else f"{split}: {rep}"
        lines.append("")
        lines += [f"    {s}" for s in summary.splitlines()]
    return lines


HYPER = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
         "lr_scheduler_type", "warmup_steps", "weight_decay", "adam_beta2", "max_grad_norm", "model_max_length",
         "bf16", "fp16", "gradient_checkpointing", "deepspeed", "seed")


def _hyper_section(trainer, extra: dict | None) -> list[str]:
    from .models.lora import describe_adapter

    values = {}
    if trainer is not None:
        values.update({k: getattr(trainer.args, k) for k in HYPER if hasattr(trainer.args, k)})
        if 0 < values.get("warmup_steps", 0) < 1:  # transformers 5 reads a warmup_steps below 1 as a ratio
            values = {("warmup_ratio" if k == "warmup_steps" else k): v for k, v in values.items()}
        values["world_size"] = trainer.args.world_size
        peft_config = getattr(trainer.model, "peft_config", None)
        if peft_config:
            cfg = next(iter(peft_config.values()))
            targets = cfg.target_modules
            values.update(lora_r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          lora_target_modules=",".join(sorted({t.rsplit(".", 1)[-1] for t in targets}))
                          if isinstance(targets, (set, list)) else targets)
            if cfg.target_parameters:  # routed experts (mixture-of-experts models)
                values["lora_target_parameters"] = ",".join(sorted(cfg.target_parameters))
            values["lora_adapted"] = describe_adapter(trainer.model)
    values.update(extra or {})
    return ["| option | value |", "|---|---|"] + [f"| {k} | {getattr(v, 'value', v)} |" for k, v in values.items()]


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_model_card(output_dir: str, *, model_path: str, kind: str, adapter: bool, data_files: dict | None = None,
                     data_reports: dict | None = None, metrics: dict | None = None, trainer=None,
                     hyperparameters: dict | None = None, command: str | None = None, plotted: bool = False,
                     chat_format: str | None = None, vision_language: bool = False, reward_model: bool = False,
                     card: str | None = None) -> str:
    """`card`: where to write it, decided before the weights were saved (card_path); by default decided now."""
    out = os.path.abspath(output_dir)
    code = loading_code(out, adapter=adapter, reward_model=reward_model, vision_language=vision_language)
    what = "a LoRA adapter" if adapter else "a full model"
    embedded = "qwen-tune-embedded" in str(model_path)
    base = f"`{model_path}`" + (" (qwen-tune's embedded tiny Qwen2 test model)" if embedded else "")
    lines = [
        "---",
        f"base_model: {model_path}",
        f"library_name: {'peft' if adapter else 'transformers'}",
        f"tags: [qwen-tune, {kind}{', lora' if adapter else ''}]",
        "---",
        f"# {os.path.basename(out)}",
        "",
        f"{what[0].upper() + what[1:]} trained with `qwen-tune {kind}` from the base model {base}.",
        "",
        "## Data",
        *_data_section(data_files or {}, data_reports or {}),
        *(["", f"Format: {chat_format}. The saved tokenizer's chat template renders exactly what was trained: "
           "serve with `tokenizer.apply_chat_template` (and the same system message)."] if chat_format else []),
        "",
        "## Hyper-parameters",
        *_hyper_section(trainer, hyperparameters),
        "",
        "## Results",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in (metrics or {}).items()],
    ]
    if plotted:
        lines += ["", f"![loss]({PLOT})"]
    lines += [
        "",
        "## Command",
        "```sh",
        command or command_line(),
        "```",
        "",
        "## Use",
        "```python",
        *code,
        'ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,',
        '                                    return_tensors="pt", return_dict=True)',
        'print(tokenizer.decode(model.generate(**ids, max_new_tokens=128)[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "Or from the command line:",
        "```sh",
        *([f"qwen-tune score --model {shlex.quote(out)} --data PAIRS.jsonl --out scores.jsonl"] if reward_model else
          [f"qwen-tune chat --model {shlex.quote(out)}", f"qwen-tune eval --model {shlex.quote(out)} --data YOUR_EVAL.json"]),
        *([f"qwen-tune merge --adapter {shlex.quote(out)} --out {shlex.quote(out + '-merged')}"] if adapter else []),
        f"tensorboard --logdir {shlex.quote(out)}",
        "```",
        "",
    ]
    path = card or card_path(output_dir)
    Path(path).write_text("\n".join(lines), encoding="utf-8")
    return path


def card_path(output_dir: str) -> str:
    """README.md, unless the output directory holds a README.md that qwen-tune did not write (train/ownership.py):
    a user's file is never overwritten (the card then goes to MODEL_CARD.md, and the run says so)."""
    from .train.ownership import users_entries

    readme = os.path.join(output_dir, CARD)
    if CARD in users_entries(output_dir):
        other = os.path.join(output_dir, "MODEL_CARD.md")
        say(f"{readme} was not written by qwen-tune, so it was left as it is; the card is {other}")
        return other
    return readme


def write_run_report(output_dir: str, **info) -> None:
    """Final `loss.png` (+ `loss.json`) and the model card `README.md` for a finished run.

    info: card (card_path, asked before the weights were saved), model_path, kind ("sft", "rm", "dpo", "ppo"), adapter,
    vision_language, reward_model, trainer (for its log history and
    arguments), metrics, data_files ({"train": paths, ...}), data_reports, hyperparameters, command,
    chat_format (the run's format description).
    Without a trainer the log comes from `info["log_history"]` or the output dir's `ppo_log.jsonl`.
    """
    trainer = info.get("trainer")
    records = info.get("log_history")
    if records is None and trainer is not None:
        records = trainer.state.log_history
    ppo_log = os.path.join(output_dir, "ppo_log.jsonl")
    if records is None and os.path.exists(ppo_log):
        records = ppo_log
    plotted = bool(records is not None and plot_losses(records, os.path.join(output_dir, PLOT)))
    write_model_card(
        output_dir, model_path=info.get("model_path", "?"), kind=info.get("kind", "sft"),
        adapter=bool(info.get("adapter")), data_files=info.get("data_files"), data_reports=info.get("data_reports"),
        metrics=info.get("metrics"), trainer=trainer, hyperparameters=info.get("hyperparameters"),
        command=info.get("command"), plotted=plotted, chat_format=info.get("chat_format"),
        vision_language=bool(info.get("vision_language")), reward_model=bool(info.get("reward_model")), card=info.get("card"),
    )
