"""Let a CPU training process reuse the memory it frees instead of asking the kernel for it again.

glibc serves every allocation above 32 MB with a fresh mmap and unmaps it on free, so each training step's
activations, gradients and logits chunks come back from the kernel as new pages, faulted in and zeroed one
4 KiB page at a time. On the 2-core machine the benchmarks run on, that was up to a quarter of the CPU time
of a Qwen2.5-0.5B-shaped SFT step. Serving blocks up to 1 GiB from the heap, and keeping up to 2 GiB of it
free at the top, lets the next step reuse the same pages: the benchmark's SFT went from 41.5 to 49.3 tokens/s
(bench/results.md). The price is some fragmentation: that run peaked 0.3 GB higher, the embedded model's
benchmark row 0.6 GB.

Only where training runs on the CPU (a GPU's memory has its own caching allocator), only with glibc, and
never over a user's own MALLOC_* / GLIBC_TUNABLES settings.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap and are reused
TRIM_THRESHOLD = 2**31 - 1  # keep up to 2 GiB free at the heap's top (mallopt takes an int)
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def reuse_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when they were set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or any(k in os.environ for k in USER_SETTINGS):
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
