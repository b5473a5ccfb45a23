"""The option groups on the plain argparse parsers of the tools that load a trained model (chat, eval, score,
preprocess, merge): the same flags and help as the training commands."""

from __future__ import annotations

import argparse
from dataclasses import fields

from .groups import CacheOptions, FormatOptions


def add_format_arguments(parser) -> None:
    for f in fields(FormatOptions):
        kind = (lambda v: v.lower() in ("1", "true", "yes")) if f.name == "enable_thinking" else str
        parser.add_argument(f"--{f.name}", type=kind, default=None, help=f.metadata["help"])


def add_cache_arguments(parser) -> None:
    for f in fields(CacheOptions):
        kind = int if f.name == "preprocessing_num_workers" else str
        parser.add_argument(f"--{f.name}", type=kind, default=None, help=f.metadata["help"])


def add_trust_argument(parser) -> None:
    """--trust_remote_code for the commands that load a model without training it (chat, eval, score, merge)."""
    from transformers.hf_argparser import string_to_bool

    parser.add_argument("--trust_remote_code", type=string_to_bool, nargs="?", const=True, default=False, metavar="BOOL",
                        help="run the checkpoint's own Python code; off unless you trust where it came from")


def inference_parser(prog: str, description: str):
    """The parser of a command that loads a trained model (chat, eval): --model and the format options."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="an output directory (full, merged or LoRA adapter) or a model (unset: the embedded model)")
    add_trust_argument(parser)
    add_format_arguments(parser)  # defaults: the template saved with the model, as trained
    return parser


def format_options(namespace) -> FormatOptions:
    return FormatOptions(**{f.name: getattr(namespace, f.name) for f in fields(FormatOptions)}).freeze()


def cache_options(namespace) -> CacheOptions:
    return CacheOptions(**{f.name: getattr(namespace, f.name) for f in fields(CacheOptions)}).freeze()
