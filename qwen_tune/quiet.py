"""Library messages that tell a qwen-tune user nothing, filtered by their exact text (nothing else is hidden).

- DeepSpeed, imported by accelerate on every run, warns "Setting accelerator to CPU" on a machine without a GPU.
- bitsandbytes warns on CPUs with AVX-512 bf16 that an optional faster 4-bit kernel package is not installed.
- transformers' Trainer, resuming a model with tied embeddings, says the checkpoint lacks `lm_head.weight`: the
  checkpoint stores the shared matrix once (as the embeddings), and the Trainer's check no longer knows it is tied.
- PEFT asks a model `is_gradient_checkpointing` and calls `gradient_checkpointing_enable`, names transformers 5
  deprecated (a FutureWarning on every LoRA run, chat, merge and eval); no setting avoids PEFT's call.
- transformers' load report (a table with terminal colour codes) when a reward model's new `score` head is made on
  a language model: that head is new by design. A report of anything else is kept.
- datasets, loading a dataset from its cache offline (`--data_path org/name`, data/hub.py), says it could not reach
  the hub and which cached version it found, several times per load; qwen-tune says once where the data came from.
"""

from __future__ import annotations

import logging
import re
import warnings

NOISE = {
    "DeepSpeed": ("Setting accelerator to CPU",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    "transformers.trainer": ("There were missing keys in the checkpoint model loaded: ['lm_head.weight'].",),
    "datasets.load": ("Using the latest cached version of the dataset since",),
    "datasets.packaged_modules.cache.cache": ("Found the latest cached dataset configuration",),
}
DEPRECATIONS = ("`is_gradient_checkpointing` is deprecated", "`gradient_checkpointing_enable` is deprecated")
COLOUR = re.compile(r"\x1b\[[0-9;]*m")


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


class _DropNewScoreHeadReport(logging.Filter):
    """transformers' LOAD REPORT whose every row is a `score.*` weight MISSING (newly made)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = COLOUR.sub("", str(record.msg))
        if " LOAD REPORT from: " not in text:
            return True
        rows = [[cell.strip() for cell in line.split("|")] for line in text.split("\n\n")[0].splitlines()[2:]]
        rows = [row for row in rows if len(row) > 1 and not set(row[0]) <= {"-"}]
        return not rows or not all(row[0].startswith("score.") and row[1] == "MISSING" for row in rows)


_installed = False


def install() -> None:
    """Attach the filters before the libraries are imported (their loggers keep them); once per process."""
    global _installed
    if _installed:
        return
    _installed = True
    for name, starts in NOISE.items():
        logging.getLogger(name).addFilter(_DropMessages(starts))
    logging.getLogger("transformers.modeling_utils").addFilter(_DropNewScoreHeadReport())
    for start in DEPRECATIONS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=FutureWarning)
