"""`qwen-tune merge --adapter OUT --out DIR`: fold a LoRA adapter into its base, save a full model."""

from __future__ import annotations

import argparse
import os

from ..options.tools import add_trust_argument
from ..errors import UserError
from ..models.model import is_adapter


def merge(adapter: str, out: str, trust_remote_code: bool = False) -> str:
    """Merge and save as safetensors with the tokenizer and generation config, as the base's own class."""
    from ..models.trained import load_trained
    from ..models.tokenizer import load_tokenizer

    if not is_adapter(adapter):
        raise UserError(f"{adapter}: no adapter_config.json; is this a LoRA output directory?")
    merged = load_trained(adapter, trust_remote_code=trust_remote_code).merge_and_unload()  # checks the checkpoint first
    merged.save_pretrained(out)
    load_tokenizer(adapter, trust_remote_code=trust_remote_code).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="qwen-tune merge", description=__doc__)
    p.add_argument("--adapter", required=True, help="a LoRA output directory")
    p.add_argument("--out", required=True, help="where to write the merged model")
    add_trust_argument(p)
    a = p.parse_args(argv)
    print(f"merged model saved to {os.path.abspath(merge(a.adapter, a.out, a.trust_remote_code))}")
