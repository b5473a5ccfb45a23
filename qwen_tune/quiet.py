"""Library messages that tell a qwen-tune user nothing, filtered by their exact text (nothing else is hidden).

- DeepSpeed, imported by accelerate on every run, warns "Setting accelerator to CPU" on a machine without a GPU.
- bitsandbytes warns on CPUs with AVX-512 bf16 that an optional faster 4-bit kernel package is not installed.
"""

from __future__ import annotations

import logging

NOISE = {
    "DeepSpeed": ("Setting accelerator to CPU",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def install() -> None:
    """Attach the filters before the libraries are imported (their loggers keep them)."""
    for name, starts in NOISE.items():
        logging.getLogger(name).addFilter(_DropMessages(starts))
