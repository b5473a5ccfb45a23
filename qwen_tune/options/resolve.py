"""Every default that depends on other options, decided once from the options and the machine's facts: no file
is read, nothing is set up, nothing global changes (options/prepare.py does that, after)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import UserError
from .method import TRAIN, Method, build_config
from .parse import parse_values
from .training import EMBEDDED_LR


@dataclass(frozen=True)
class Machine:
    """What resolving needs to know of the machine."""

    cuda: bool
    bf16_supported: bool

    @classmethod
    def here(cls) -> "Machine":
        import torch

        cuda = torch.cuda.is_available()
        return cls(cuda=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported())


def load(method: Method, argv: list[str] | None = None):
    """Parse argv for `method` and resolve it: the run's frozen config."""
    return resolve(method, parse_values(method.name, method.groups, argv), Machine.here())


def resolve(method: Method, values: dict[str, dict], machine: Machine):
    values = {name: dict(group) for name, group in values.items()}
    check_inputs(values)
    if method.resolve is not None:
        method.resolve(values)
    notes, settings = [], {}
    if TRAIN in values:
        notes, settings = resolve_training(method, values, machine)
    return build_config(method, values, notes, settings)


def check_inputs(values: dict[str, dict]) -> None:
    """Mistakes in the shared groups, each one line before anything is loaded."""
    data, lora = values.get("data"), values.get("lora")
    if data is not None and not data["data_path"]:
        raise UserError("--data_path is required (a data file such as .jsonl or .parquet, or a directory; see data/ for examples)")
    if data is not None and data["val_size"] and data["eval_data_path"]:
        raise UserError("--val_size holds out part of --data_path for evaluation; give it or --eval_data_path, not both")
    if lora is not None and lora["q_lora"] and not lora["use_lora"]:
        raise UserError("--q_lora trains a LoRA adapter on a 4-bit base: add --use_lora True")


def resolve_training(method: Method, values: dict[str, dict], machine: Machine) -> tuple[list[str], dict]:
    """transformers' TrainingArguments values as qwen-tune runs them; returns (notes, trainer settings)."""
    train, notes = values[TRAIN], []
    if (train["bf16"] or train["fp16"]) and not machine.cuda and not train["use_cpu"]:
        # a YAML written for GPUs still runs here: CPU half precision means slow fallback kernels
        notes.append(f"{'--bf16' if train['bf16'] else '--fp16'} True asked for, but there is no CUDA GPU: training in fp32 on the CPU")
        train["bf16"] = train["fp16"] = False
    if train["bf16"] and machine.cuda and not machine.bf16_supported:
        raise UserError("--bf16: this GPU has no bfloat16 support; use --fp16 True instead")
    if not machine.cuda:
        train["dataloader_pin_memory"] = False  # nothing to pin to (and torch warns about it)
    if train["activation_checkpointing"] is None and train["gradient_checkpointing"] is not None:
        # the seed's --gradient_checkpointing (and TRL's defaults) under transformers 5's name: no deprecation warning
        train["activation_checkpointing"], train["gradient_checkpointing"] = train["gradient_checkpointing"], None
    if train["warmup_ratio"] and not train["warmup_steps"]:
        train["warmup_steps"] = train["warmup_ratio"]
    if train["train_sampling_strategy"] == "auto":
        train["train_sampling_strategy"] = "random"
    if train["learning_rate"] is None:
        group, option = method.model_option
        lora = values.get("lora", {}).get("use_lora", False)
        rates = method.learning_rates
        train["learning_rate"] = EMBEDDED_LR if not values[group][option] else (rates.lora if lora else rates.full)
    # Rotation counts complete checkpoints only (train/checkpoints.py); the Trainer's own would delete the previous
    # checkpoint before the new one is marked complete, so it gets no limit.
    settings = {"checkpoint_limit": train["save_total_limit"]}
    train["save_total_limit"] = None
    declared = {f.name for f in fields(method.trainer_arguments)}
    if "trust_remote_code" in declared:  # TRL configs read it from their own arguments
        settings["trust_remote_code"] = next(g["trust_remote_code"] for g in values.values() if "trust_remote_code" in g)
    if "chat_template_kwargs" in declared and "format" in values:  # TRL renders prompts with the run's switches
        from .groups import FormatOptions

        settings["chat_template_kwargs"] = FormatOptions(**values["format"]).template_kwargs()
    return notes, settings
