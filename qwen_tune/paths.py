"""Where qwen-tune keeps what it makes once: converted tokenizers, the embedded model, help texts."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`QWEN_TUNE_CACHE`, else `$XDG_CACHE_HOME/qwen_tune` (default `~/.cache/qwen_tune`)."""
    root = os.environ.get("QWEN_TUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "qwen_tune"
    )
    return Path(root)
