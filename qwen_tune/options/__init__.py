"""A command's options: parsed, resolved once into a frozen config, then acted on once.

    config = load(METHOD, argv)      # parse.py + resolve.py: values only, no I/O beyond the YAML, nothing set up
    prepared = prepare_run(config)   # prepare.py, the first line of every run: allocator, ranks, output dir, resume, seed

Each method declares its `Method` (method.py) from the option groups it reads (groups.py, training.py).
"""

from .groups import (CacheOptions, DataOptions, FormatOptions, ImageOptions, LayoutOptions, LoraOptions, ModelOptions,
                     set_chat_format)
from .method import LearningRates, Method
from .prepare import PreparedRun, prepare_run
from .resolve import Machine, load, resolve
from .training import RunArguments, TrainingArguments, train_dtype

__all__ = ["CacheOptions", "DataOptions", "FormatOptions", "ImageOptions", "LayoutOptions", "LearningRates", "LoraOptions", "Machine",
           "Method", "ModelOptions", "PreparedRun", "RunArguments", "TrainingArguments", "load", "prepare_run", "resolve",
           "set_chat_format", "train_dtype"]
