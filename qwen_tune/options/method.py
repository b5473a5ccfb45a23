"""What a command is made of, and its options once resolved.

Each command's module (a training method or a tool) declares a `Method`: its option groups (only those it reads, so
an option it would ignore is rejected) and its own defaults. `load(method, argv)` parses and resolves them into a frozen `Config` before anything
else runs; `prepare_run(config)` (options/prepare.py) is then the first line of the method's `run`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from types import MappingProxyType
from typing import Callable, Mapping

TRAIN = "train"  # the group of transformers' TrainingArguments (or a TRL config), kept as read-only values


@dataclass(frozen=True)
class LearningRates:
    """The method's --learning_rate when none is given (the embedded model always gets options.training.EMBEDDED_LR)."""

    full: float
    lora: float


@dataclass(frozen=True)
class Method:
    """A command: the option groups it reads, by the attribute its config gives each, and the defaults it decides."""

    name: str
    groups: dict[str, type]  # attribute of the config -> option group; TRAIN: a TrainingArguments class
    learning_rates: LearningRates | None = None  # None: the method decides it itself (ppo: from the model's size)
    model_option: tuple[str, str] = ("model", "model_name_or_path")  # (group, option) naming the starting model
    resolve: Callable[[dict[str, dict]], None] | None = None  # the method's own dependent defaults, on the values
    run_group: str = TRAIN  # the group holding output_dir, overwrite_output_dir, resume_from_checkpoint, seed, deepspeed
    config_class: type = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        extra = [("notes", tuple), ("trainer_settings", Mapping)]
        cls = make_dataclass(f"{self.name.capitalize()}Config", [(n, object) for n in self.groups] + extra, frozen=True)
        cls.__doc__ = f"The resolved options of qwen-tune {self.name}, one frozen group per attribute."
        cls.method = self  # a class attribute, not an option
        object.__setattr__(self, "config_class", cls)

    @property
    def trainer_arguments(self) -> type | None:
        return self.groups.get(TRAIN)


def build_config(method: Method, values: dict[str, dict], notes: tuple[str, ...] = (), trainer_settings: dict | None = None):
    """The frozen config: each option group built and frozen, the training values as a read-only mapping. `notes`:
    what resolving changed, said once when the run starts. `trainer_settings`: attributes of the Trainer's
    arguments that are not command-line options (TRL reads `trust_remote_code` and `chat_template_kwargs` from its
    config; --save_total_limit becomes `checkpoint_limit`), set once when prepare_run builds them."""
    built = {}
    for name, cls in method.groups.items():
        if name == TRAIN:
            built[name] = MappingProxyType(dict(values[name]))
        else:
            try:
                built[name] = cls(**values[name]).freeze()
            except ValueError as e:
                from ..errors import UserError

                raise UserError(str(e)) from e
    return method.config_class(**built, notes=tuple(notes), trainer_settings=MappingProxyType(dict(trainer_settings or {})))

