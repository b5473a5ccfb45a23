"""A command's options: parsed, resolved once into a frozen config, then acted on once.

    config = load(METHOD, argv)      # parse.py + resolve.py: values only, no I/O beyond the YAML, nothing set up
    prepared = prepare_run(config)   # prepare.py, the first line of every run: allocator, ranks, output dir, resume, seed

Each method declares its `Method` (method.py) from the option groups it reads (groups.py, training.py).
The names below are imported when first used: spec.py checks a command line before torch is imported.
"""

import importlib

_WHERE = {"CacheOptions": "groups", "DataOptions": "groups", "FormatOptions": "groups", "ImageOptions": "groups",
          "LayoutOptions": "groups", "LoraOptions": "groups", "ModelOptions": "groups", "set_chat_format": "groups",
          "VisionTrainingOptions": "groups",
          "LearningRates": "method", "Method": "method", "PreparedRun": "prepare", "prepare_run": "prepare",
          "Machine": "resolve", "load": "resolve", "resolve": "resolve", "RunArguments": "training",
          "TrainingArguments": "training", "train_dtype": "training"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_WHERE[name]}")
    for export, where in _WHERE.items():  # all of the module's names at once (`resolve`: the function, not the module)
        if where == _WHERE[name]:
            globals()[export] = getattr(module, export)
    return globals()[name]
