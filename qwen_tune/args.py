"""Command-line options as dataclasses (HF TrainingArguments style, as the seed's finetune.py).

Every training subcommand parses `ModelArguments`, `DataArguments`, `LoraArguments` and
`TrainingArguments`; `--config FILE.yaml` supplies values that flags on the command line override.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field

import torch
import transformers
from transformers import HfArgumentParser

from .errors import UserError

# Learning rates that work when none is given: the seed's, and a large one for the tiny embedded model.
SEED_LR_FULL, SEED_LR_LORA, EMBEDDED_LR = 1e-5, 3e-4, 1e-2


@dataclass
class ModelArguments:
    _argument_group_name = "model"  # HfArgumentParser prints each dataclass as a --help group
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local directory or hub id of a Qwen checkpoint (unset: the embedded tiny Qwen2 model)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run a checkpoint's own Python code (Qwen v1). Off unless you trust it."}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "sdpa, eager or flash_attention_2 (unset: transformers' choice)."}
    )
    allow_pickle_weights: bool = field(
        default=False, metadata={"help": "Load a checkpoint that has only pickle weights (pytorch_model.bin). Off: safetensors only."}
    )


@dataclass
class FormatArguments:
    """How conversations become tokens: every command that reads or writes conversations takes these."""

    chat_template: str | None = field(
        default=None,
        metadata={"help": "A Jinja file or an official template name (qwen2_5, qwen3, qwen3_instruct_2507, qwen3_5_think, "
                          "qwen3_6, qwen3_8, ...) instead of the checkpoint's own; saved with the output."},
    )
    system_message: str | None = field(
        default=None,
        metadata={"help": "System turn added to conversations without one. Not given: the template decides (Qwen2.5 adds its "
                          "default, Qwen3 none; the embedded ChatML uses 'You are a helpful assistant.', '' for none)."},
    )
    enable_thinking: bool | None = field(
        default=None, metadata={"help": "Passed to the template (Qwen3 / Qwen3.5+): false asks for replies without reasoning."}
    )
    chat_template_kwargs: str | None = field(
        default=None, metadata={"help": 'Other template switches as JSON, e.g. \'{"preserve_thinking": true}\'.'}
    )

    def chat_format(self, tokenizer, source: str = "the checkpoint"):
        """The run's `ChatFormat`; the tokenizer then carries the template, so saving it serves what was trained."""
        import json

        from .data.chat_format import resolve_format

        try:
            kwargs = json.loads(self.chat_template_kwargs) if self.chat_template_kwargs else {}
        except json.JSONDecodeError as e:
            raise UserError(f"--chat_template_kwargs is not valid JSON: {e}") from e
        if not isinstance(kwargs, dict):
            raise UserError("--chat_template_kwargs must be a JSON object")
        return resolve_format(tokenizer, self.chat_template, self.system_message, self.enable_thinking, kwargs, source)


def add_format_arguments(parser) -> None:
    """The `FormatArguments` options on a plain argparse parser (chat, eval, score, preprocess)."""
    from dataclasses import fields

    for f in fields(FormatArguments):
        kind = (lambda v: v.lower() in ("1", "true", "yes")) if f.name == "enable_thinking" else str
        parser.add_argument(f"--{f.name}", type=kind, default=None, help=f.metadata["help"])


def inference_parser(prog: str, description: str):
    """The parser of a command that loads a trained model (chat, eval): --model and the format options."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="an output directory (full, merged or LoRA adapter) or a model (unset: the embedded model)")
    add_trust_argument(parser)
    add_format_arguments(parser)  # defaults: the template saved with the model, as trained
    return parser


def add_trust_argument(parser) -> None:
    """--trust_remote_code for the commands that load a model without training it (chat, eval, score, merge)."""
    from transformers.hf_argparser import string_to_bool

    parser.add_argument("--trust_remote_code", type=string_to_bool, nargs="?", const=True, default=False, metavar="BOOL",
                        help="run the checkpoint's own Python code; off unless you trust where it came from")


def format_arguments(namespace) -> FormatArguments:
    from dataclasses import fields

    return FormatArguments(**{f.name: getattr(namespace, f.name) for f in fields(FormatArguments)})


@dataclass
class CacheArguments:
    """How conversations are tokenized once and kept (data/cache.py): sft, preprocess and eval take these."""

    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes that tokenize the data (unset: min(4, CPU count))."}
    )
    tokens_cache: str | None = field(
        default=None, metadata={"help": "Where tokenized data is kept and reused while data, tokenizer, template and options are "
                                       "unchanged (unset: $QWEN_TUNE_CACHE/tokens, default ~/.cache/qwen_tune/tokens; none: off)."}
    )


def add_cache_arguments(parser) -> None:
    """The `CacheArguments` options on a plain argparse parser (preprocess, eval)."""
    from dataclasses import fields

    for f in fields(CacheArguments):
        kind = int if f.name == "preprocessing_num_workers" else str
        parser.add_argument(f"--{f.name}", type=kind, default=None, help=f.metadata["help"])


def cache_options(namespace):
    """The `data.cache.CacheOptions` of parsed `CacheArguments` (a DataArguments or an argparse namespace)."""
    from .data.cache import CacheOptions

    return CacheOptions(namespace.tokens_cache, namespace.preprocessing_num_workers)


@dataclass
class DataArguments(CacheArguments, FormatArguments):
    _argument_group_name = "data"
    data_path: str | None = field(
        default=None, metadata={"help": "Training data: a .json/.jsonl(.gz), .csv, .parquet or .arrow file, a datasets save_to_disk "
                                 "directory, a directory of data files, or a comma-separated list; weighted: a.jsonl:0.7,b.parquet:0.3."}
    )
    eval_data_path: str | None = field(default=None, metadata={"help": "Evaluation data, same formats."})
    val_size: float = field(
        default=0.0, metadata={"help": "Instead of --eval_data_path: hold out this fraction (0-1) or number (>= 1) of the training "
                                       "samples for evaluation, chosen with --seed and listed in the log (0: none)."}
    )
    packing: bool = field(
        default=True, metadata={"help": "Padding-free packing of each batch into one row (no compute on padding)."}
    )
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "The seed's behaviour: pad every sample to model_max_length (for comparison)."}
    )
    lazy_preprocess: bool = field(default=False, metadata={"help": "Accepted for the seed's scripts; has no effect."})


@dataclass
class LoraArguments:
    _argument_group_name = "LoRA / Q-LoRA"
    use_lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    q_lora: bool = field(default=False, metadata={"help": "Q-LoRA: 4-bit NF4 base (bitsandbytes) + LoRA; needs --use_lora."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float | None = field(
        default=None,
        metadata={"help": "Dropout on the LoRA path (unset: 0.05, or 0 on a mixture-of-experts model whose routed experts are "
                          "adapted: PEFT adapts them with a ParamWrapper, which takes no dropout)."},
    )
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "Comma-separated module names, or all-linear (every projection, not lm_head; on a mixture-of-experts "
                          "model also the routed experts, not the routers). A list may name experts (experts, gate_up_proj)."},
    )
    lora_modules_to_save: str | None = field(
        default=None,
        metadata={"help": "Also train and save these whole modules, e.g. embed_tokens,lm_head (a base model's untrained ChatML tokens)."},
    )

    def adapter_options(self) -> dict:
        """These settings as keyword arguments of `lora.lora_config` / `lora.add_lora`."""
        return {"r": self.lora_r, "alpha": self.lora_alpha, "dropout": self.lora_dropout,
                "target_modules": split_modules(self.lora_target_modules),
                "modules_to_save": split_modules(self.lora_modules_to_save) or None}


def split_modules(value: str | None):
    """"a,b" -> ["a", "b"]; "all-linear" and None pass through (PEFT understands them)."""
    if value is None or value == "all-linear":
        return value
    return [m.strip() for m in value.split(",") if m.strip()]


def _default_report_to() -> str:
    return "tensorboard" if importlib.util.find_spec("tensorboard") else "none"


@dataclass
class RunArguments:
    """Options every method's run shares, declared once: the Trainer methods take them over transformers'
    TrainingArguments (below), ppo's own loop reads them itself."""

    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow writing over a finished run in output_dir."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "auto (the newest complete checkpoint in output_dir) or a checkpoint directory."}
    )
    keep_checkpoints: bool = field(
        default=False, metadata={"help": "Keep the checkpoint-N directories after a successful run (otherwise removed once the result is saved)."}
    )
    seed: int = field(default=42, metadata={"help": "Seed for data order, initialisation and sampling."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (Qwen's 0.95)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (global norm)."})
    deepspeed: str | None = field(
        default=None, metadata={"help": "DeepSpeed config (recipes/ds_config_zero2.json, ds_config_zero3.json); launch with torchrun."}
    )


@dataclass
class TrainingArguments(RunArguments, transformers.TrainingArguments):
    """transformers' TrainingArguments with the seed's defaults and a few qwen-tune options."""

    _argument_group_name = "training (transformers TrainingArguments; DeepSpeed, logging, checkpoints)"

    output_dir: str = field(default="output_qwen", metadata={"help": "Where checkpoints and the result go."})
    model_max_length: int = field(default=512, metadata={"help": "Longest sample in tokens. sft: longer samples keep their head and are counted; rm / dpo: longer pairs are dropped and named (a reply cut short has no end to score)."})
    learning_rate: float | None = field(
        default=None,
        metadata={"help": f"Peak learning rate (unset: {SEED_LR_FULL} full, {SEED_LR_LORA} LoRA; {EMBEDDED_LR} on the embedded model)."},
    )
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (DeepSpeed configs never override it)."})
    warmup_ratio: float = field(default=0.01, metadata={"help": "Fraction of steps for linear warm-up."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Passes over the training data."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N optimizer steps."})
    save_strategy: str = field(default="steps", metadata={"help": "no, steps or epoch."})
    save_steps: float = field(default=1000, metadata={"help": "Save a checkpoint every N steps."})
    save_total_limit: int | None = field(default=10, metadata={"help": "Keep at most N checkpoints (the newest complete one is never deleted)."})
    report_to: None | str | list[str] = field(default_factory=_default_report_to, metadata={"help": "tensorboard (default when installed), none, wandb, ..."})
    include_num_input_tokens_seen: str = field(default="non_padding", metadata={"help": "Count real (non-pad) tokens for tokens/s."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep sample ids in batches (for error messages)."})
    train_sampling_strategy: str = field(
        default="auto",
        metadata={"help": "auto (group_by_length when packing is off, else random), random, sequential, group_by_length, batch_rebalance.",
                  "choices": ["auto", "random", "sequential", "group_by_length", "batch_rebalance"]},
    )
    max_bad_steps: int = field(default=0, metadata={"help": "Skip up to N steps with a non-finite loss/gradient instead of stopping."})

    checkpoint_limit: int | None = field(default=None, init=False)  # --save_total_limit, enforced by train.checkpoints

    precision_fallback: str | None = field(default=None, init=False)  # said once by resolve_options

    def __post_init__(self):
        if (self.bf16 or self.fp16) and not torch.cuda.is_available() and not self.use_cpu:
            # a YAML written for GPUs still runs here: CPU half precision means slow fallback kernels
            asked = "--bf16" if self.bf16 else "--fp16"
            self.bf16 = self.fp16 = False
            self.precision_fallback = f"{asked} True asked for, but there is no CUDA GPU: training in fp32 on the CPU"
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin to (and torch warns about it)
        if self.activation_checkpointing is None and self.gradient_checkpointing is not None:
            # the seed's --gradient_checkpointing (and TRL's defaults) under transformers 5's name: no deprecation warning
            self.activation_checkpointing, self.gradient_checkpointing = self.gradient_checkpointing, None
        if self.warmup_ratio and not self.warmup_steps:
            self.warmup_steps = self.warmup_ratio
        super().__post_init__()
        # Rotation counts complete checkpoints only (train/checkpoints.py); the Trainer's own would delete the
        # previous checkpoint before the new one is marked complete, so it gets no limit.
        self.checkpoint_limit, self.save_total_limit = self.save_total_limit, None


def resolve_options(model_args: ModelArguments, data_args: DataArguments, lora_args: LoraArguments,
                    args: TrainingArguments) -> None:
    """Check the options and decide every default that depends on others, once, before any data or model
    is loaded; the run reads them and changes nothing afterwards. Also checks the output directory and
    resolves `--resume_from_checkpoint auto`."""
    from .train.output_dir import prepare_output_dir

    if not data_args.data_path:
        raise UserError("--data_path is required (a data file such as .jsonl or .parquet, or a directory; see data/ for examples)")
    if data_args.val_size and data_args.eval_data_path:
        raise UserError("--val_size holds out part of --data_path for evaluation; give it or --eval_data_path, not both")
    if lora_args.q_lora and not lora_args.use_lora:
        raise UserError("--q_lora trains a LoRA adapter on a 4-bit base: add --use_lora True")
    if lora_args.q_lora and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--q_lora needs bitsandbytes: pip install bitsandbytes")
    if args.bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise UserError("--bf16: this GPU has no bfloat16 support; use --fp16 True instead")
    if args.train_sampling_strategy == "auto":  # SFT decides it from its layout before calling this
        args.train_sampling_strategy = "random"
    if args.learning_rate is None:
        embedded = not model_args.model_name_or_path
        args.learning_rate = EMBEDDED_LR if embedded else (SEED_LR_LORA if lora_args.use_lora else SEED_LR_FULL)
    if "trust_remote_code" in getattr(args, "__dataclass_fields__", {}):  # TRL configs read it from their own args
        args.trust_remote_code = model_args.trust_remote_code
    prepare_output_dir(args)
    if args.precision_fallback:
        from .train.distributed import log

        log(args.precision_fallback)


def train_dtype(args: TrainingArguments) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


# Spellings from the seed's scripts and transformers 4 that we keep accepting.
OLD_SPELLINGS = {"--evaluation_strategy": "--eval_strategy"}


EMBEDDED_SECTION = "embedded_model"  # YAML options for the embedded tiny model (and models trained from it)
MODEL_FLAGS = ("model_name_or_path", "policy")  # where each subcommand names the model it starts from
EMBEDDED_SHAPE = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def is_embedded_model(model: str | None) -> bool:
    """No model, or a directory holding the embedded model or one trained from it (its tiny shape; an adapter's base):
    the demo settings of a YAML's `embedded_model:` section apply to those, so `sh recipes/train_dpo.sh -m output/demo`
    learns visibly too. A hub id or a real checkpoint is never the embedded model."""
    import json
    from pathlib import Path

    if not model:
        return True
    adapter, config = Path(model, "adapter_config.json"), Path(model, "config.json")
    try:
        if adapter.is_file():
            return is_embedded_model(json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path"))
        if not config.is_file():
            return False
        mine = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # unreadable: not ours to judge here; loading the model reports it
    reference = json.loads(Path(__file__).with_name("assets").joinpath("embedded_model_config.json").read_text())
    return all(mine.get(key) == reference[key] for key in EMBEDDED_SHAPE)


def _flag_value(argv: list[str], name: str) -> str | None:
    """The last value given to --name (as `--name VALUE` or `--name=VALUE`), or None."""
    value = None
    for i, a in enumerate(argv):
        if a == "--" + name and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
    return value


def _config_values(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"--config {path}: {e}") from e
    if not isinstance(values, dict) or not isinstance(values.get(EMBEDDED_SECTION, {}), dict):
        raise UserError(f"--config {path}: expected a mapping of option: value ({EMBEDDED_SECTION}: a mapping too)")
    return values


def _values_to_argv(values: dict) -> list[str]:
    argv = []
    for key, value in values.items():
        flag = "--" + str(key)
        if isinstance(value, list):
            argv += [flag] + [str(v) for v in value]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def expand_argv(argv: list[str]) -> list[str]:
    """Put a YAML config's options first so that command-line flags (parsed later) win. Its `embedded_model:`
    section (the tiny model's demo settings) comes in between when the run starts from the embedded model."""
    argv = [OLD_SPELLINGS.get(a.split("=")[0], a.split("=")[0]) + (a[len(a.split("=")[0]):] if "=" in a else "") for a in argv]
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UserError("--config needs a YAML file")
        values = _config_values(argv[i + 1])
        embedded = values.pop(EMBEDDED_SECTION, {})
        rest = argv[:i] + argv[i + 2 :]
        models = [_flag_value(rest, f) or values.get(f) for f in MODEL_FLAGS]
        demo = is_embedded_model(next((str(m) for m in models if m), None))
        argv = _values_to_argv(values) + (_values_to_argv(embedded) if demo else []) + rest
    return argv


def parse(dataclass_types: tuple, argv: list[str] | None = None, prog: str | None = None):
    """Parse argv into the dataclasses; bad values become a UserError (no traceback)."""
    argv = expand_argv(sys.argv[1:] if argv is None else argv)
    import argparse

    from .train.cpu_memory import reuse_freed_memory
    from .train.distributed import prepare_cpu_ranks

    if any(issubclass(t, RunArguments) for t in dataclass_types) and not torch.cuda.is_available():
        reuse_freed_memory()  # a training run on the CPU: steps reuse freed pages (train/cpu_memory.py)
    takes_accelerator_config = any("accelerator_config" in getattr(t, "__dataclass_fields__", {}) for t in dataclass_types)
    if prepare_cpu_ranks(argv) and takes_accelerator_config:  # must precede TrainingArguments, which must then use its state
        argv = argv + ["--accelerator_config", '{"use_configured_state": true}']

    parser = HfArgumentParser(dataclass_types, prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
                              usage="%(prog)s [--config FILE.yaml] [--option VALUE ...]")
    parser.add_argument("--config", help="YAML file of options (option: value); command-line flags override it.")
    try:
        *parsed, extra = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as e:
        raise UserError(str(e)) from e
    if extra:
        raise UserError(unknown_options(extra, dataclass_types))
    return parsed[: len(dataclass_types)]  # the rest is the --config namespace, already applied


def unknown_options(extra: list[str], dataclass_types: tuple) -> str:
    """Name each unknown flag (no abbreviations are accepted) with the closest real ones."""
    import difflib
    from dataclasses import fields

    known = ["--config"] + [f"--{f.name}" for t in dataclass_types for f in fields(t) if f.init]
    lines = []
    for flag in (a.split("=")[0] for a in extra if a.startswith("--")):
        close = difflib.get_close_matches(flag, known, n=3, cutoff=0.75)
        lines.append(f"unknown option {flag}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    return "; ".join(lines or [f"unexpected arguments: {' '.join(extra)}"]) + " (see --help)"
