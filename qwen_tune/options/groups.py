"""Option groups that several commands share, each a dataclass whose fields carry their `--help`.

A command's config is made of the groups it reads (litgpt's way), so an option that a command would ignore is not
one of its options at all. `resolve()` (options/resolve.py) builds the groups once and freezes them: a run reads
its options and never changes them.
"""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError, dataclass, field, fields

from ..errors import UserError


class Frozen:
    """Fields may be set while a group is built; once `freeze()`d, setting one raises FrozenInstanceError. Not
    `frozen=True`, because a frozen dataclass cannot extend transformers' (mutable) ones."""

    def freeze(self):
        object.__setattr__(self, "_frozen", True)
        return self

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise FrozenInstanceError(f"cannot assign to field {name!r}: options are resolved once, before the run")
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        if getattr(self, "_frozen", False):
            raise FrozenInstanceError(f"cannot delete field {name!r}: options are resolved once, before the run")
        object.__delattr__(self, name)


@dataclass
class ModelOptions(Frozen):
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
class FormatOptions(Frozen):
    """How conversations become tokens: every command that reads or writes conversations takes these."""

    _argument_group_name = "chat format"
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

    def template_kwargs(self) -> dict:
        """The switches the template is rendered with: --chat_template_kwargs plus --enable_thinking."""
        try:
            kwargs = json.loads(self.chat_template_kwargs) if self.chat_template_kwargs else {}
        except json.JSONDecodeError as e:
            raise UserError(f"--chat_template_kwargs is not valid JSON: {e}") from e
        if not isinstance(kwargs, dict):
            raise UserError("--chat_template_kwargs must be a JSON object")
        return kwargs | ({} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking})


@dataclass
class ImageOptions(Frozen):
    """How the images of conversations are sized for a vision-language checkpoint (commands that train on images)."""

    _argument_group_name = "images"
    min_pixels: int | None = field(
        default=None, metadata={"help": "Smallest image area in pixels after resizing (unset: the checkpoint's processor's)."}
    )
    max_pixels: int | None = field(
        default=None, metadata={"help": "Largest image area in pixels after resizing; each 32x32 (Qwen3-VL, Qwen3.5) or 28x28 "
                                       "(Qwen2.5-VL) block is one token (unset: the checkpoint's processor's)."}
    )


@dataclass
class VisionTrainingOptions(Frozen):
    """What of a vision-language checkpoint's vision tower trains (the training commands; the rest of it stays frozen).
    Not in ImageOptions: eval and preprocess size images too, and would ignore these."""

    _argument_group_name = "vision training"
    train_vision: bool = field(
        default=False, metadata={"help": "Train the vision tower's ViT (patch and position embeddings, blocks): in full, or with "
                                        "LoRA adapters on its blocks under --use_lora (merge before serving: vLLM ignores "
                                        "LoRA there). Off: frozen."}
    )
    train_merger: bool = field(
        default=False, metadata={"help": "Train the merger(s) that project vision features into the language model (Qwen3-VL: "
                                        "also the deepstack mergers): in full, also under --use_lora (saved in the adapter). "
                                        "Off: frozen."}
    )

    def switches(self) -> dict:
        """These settings as keyword arguments of `model.load_model` and `lora.add_lora`."""
        return {"train_vision": self.train_vision, "train_merger": self.train_merger}


def set_chat_format(tokenizer, options: FormatOptions, source: str = "the checkpoint", images=None):
    """The run's `ChatFormat`, installed on `tokenizer` (which then carries the template, so saving it serves what
    was trained). `images`: the run's `ImageInputs` when it trains a vision-language checkpoint on images."""
    from ..data.chat_format import resolve_format

    return resolve_format(tokenizer, options.chat_template, options.system_message, None, options.template_kwargs(), source,
                          images=images)


@dataclass
class CacheOptions(Frozen):
    """How conversations are tokenized once and kept (data/cache.py): sft, preprocess and eval take these."""

    _argument_group_name = "tokens cache"
    tokens_cache: str | None = field(
        default=None, metadata={"help": "Where tokenized data is kept and reused while data, tokenizer, template and options are "
                                       "unchanged (unset: $QWEN_TUNE_CACHE/tokens, default ~/.cache/qwen_tune/tokens; none: off)."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes that tokenize the data (unset: min(4, CPU count))."}
    )

    def directory(self):
        """The cache's folder, or None when it is off."""
        from pathlib import Path

        if self.tokens_cache and self.tokens_cache.lower() in ("none", "off", "false", "no"):
            return None
        if self.tokens_cache:
            return Path(self.tokens_cache).expanduser()
        from ..paths import cache_dir

        return cache_dir() / "tokens"

    def num_workers(self) -> int:
        import os

        return max(1, self.preprocessing_num_workers or min(4, os.cpu_count() or 1))


# The longest sample, in tokens, unless --model_max_length says otherwise: LLaMA-Factory's cutoff_len and axolotl's
# sequence_len default. 512 (the seed's) cut Qwen3.5+ tool conversations: their template's tool instructions alone are
# about 400 tokens. A fixed number, not one read from the data, so that sft, eval and preprocess cut alike.
DEFAULT_MAX_LENGTH = 2048


@dataclass
class DataOptions(Frozen):
    """Training and evaluation data of the methods that learn from conversations or pairs (sft, rm, dpo)."""

    _argument_group_name = "data"
    data_path: str | None = field(
        default=None, metadata={"help": "Training data: a .json/.jsonl(.gz), .csv, .parquet or .arrow file, a datasets save_to_disk "
                                 "directory, a directory of data files, a dataset in the local Hugging Face cache (org/name[:config][:split], "
                                 "offline), or a comma-separated list; weighted: a.jsonl:0.7,b.parquet:0.3."}
    )
    eval_data_path: str | None = field(default=None, metadata={"help": "Evaluation data, same formats."})
    val_size: float = field(
        default=0.0, metadata={"help": "Instead of --eval_data_path: hold out this fraction (0-1) or number (>= 1) of the training "
                                       "samples for evaluation, chosen with --seed and listed in the log (0: none)."}
    )
    model_max_length: int = field(default=DEFAULT_MAX_LENGTH, metadata={"help": "Longest sample in tokens. sft: longer samples keep their head and are counted (a warning names those that lose part of a reply); rm / dpo: longer pairs are dropped and named (a reply cut short has no end to score)."})


@dataclass
class LayoutOptions(Frozen):
    """How SFT lays samples out in a batch."""

    _argument_group_name = "batch layout"
    packing: bool = field(
        default=True, metadata={"help": "Padding-free packing of each batch into one row (no compute on padding)."}
    )
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "The seed's behaviour: pad every sample to model_max_length (for comparison; turns packing off)."}
    )
    lazy_preprocess: bool = field(default=False, metadata={"help": "Accepted for the seed's scripts: the data is always tokenized once and memory-mapped."})


@dataclass
class LoraOptions(Frozen):
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


SHARED_GROUPS = (ModelOptions, FormatOptions, ImageOptions, VisionTrainingOptions, CacheOptions, DataOptions, LayoutOptions,
                 LoraOptions)


def group_of(option: str):
    """The shared group that declares `option` (without its --), or None."""
    return next((g for g in SHARED_GROUPS if option in {f.name for f in fields(g)}), None)
