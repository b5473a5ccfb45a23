"""`qwen-tune merge --adapter OUT --out DIR`: fold a LoRA adapter into its base, save a full model."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import UserError
from ..options import Method, load
from ..options.groups import Frozen
from ..options.tools import TrustOptions, required
from ..models.model import is_adapter


def merge(adapter: str, out: str, trust_remote_code: bool = False) -> str:
    """Merge and save as safetensors with the tokenizer and generation config, as the base's own class."""
    from ..models.trained import load_trained
    from ..models.tokenizer import load_tokenizer, save_tokenizer

    if not is_adapter(adapter):
        raise UserError(f"{adapter}: no adapter_config.json; is this a LoRA output directory?")
    merged = load_trained(adapter, trust_remote_code=trust_remote_code).merge_and_unload()  # checks the checkpoint first
    merged.save_pretrained(out)
    save_tokenizer(load_tokenizer(adapter, trust_remote_code=trust_remote_code), out)
    return out


@dataclass
class MergeOptions(Frozen):
    _argument_group_name = "merge"
    adapter: str | None = field(default=None, metadata={"help": "A LoRA output directory."})
    out: str | None = field(default=None, metadata={"help": "Where to write the merged model."})


METHOD = Method("merge", groups={"merge": MergeOptions, "trust": TrustOptions},
                resolve=lambda values: required(values, "merge", "adapter", "out"))


def main(argv: list[str] | None = None) -> None:
    config = load(METHOD, argv)
    a = config.merge
    print(f"merged model saved to {os.path.abspath(merge(a.adapter, a.out, config.trust.trust_remote_code))}")
