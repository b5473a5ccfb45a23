"""Crash safety for every trainer: output-dir checks before work starts, and trainer callbacks.

(Integration point: `prepare_output_dir` runs before any data or model is loaded;
`safety_callbacks` are added to every HF Trainer qwen-tune builds.)
"""

from __future__ import annotations


def prepare_output_dir(args) -> None:
    """Refuse, before any work, to start a run that would lose work (filled in by the crash-safety issue)."""


def safety_callbacks(args) -> list:
    """Trainer callbacks that guard a run (filled in by the crash-safety issue)."""
    return []
