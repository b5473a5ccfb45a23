"""A CPU training run reuses the memory it frees (train/cpu_memory.py).

Without it glibc returns every block above 32 MB to the kernel, and each step's activations are
page-faulted and zeroed again: measured as the page faults of allocating a 128 MB tensor a second time,
in a fresh process, after the real `qwen-tune sft` run preparation (or without it, or with the user's own
glibc setting, which must be left alone). The fewest faults of three reallocations: about one run in eight, the
heap's free space after the first block does not fit the next aligned block of the same size and the heap grows
once; from then on the blocks are reused (without the setting, every reallocation faults its 128 MB in again).
"""

import subprocess
import sys

import pytest

from helpers import ROOT, fresh_env

REALLOCATE = r"""
import resource, sys, torch
if sys.argv[1] == "sft":  # the control imports torch only: its allocations are glibc's, whatever else is imported
    from qwen_tune.methods import sft
    from qwen_tune.options import load, prepare_run

    prepare_run(load(sft.METHOD, ["--data_path", "data/sft_example.json", "--output_dir", sys.argv[2]]))
block = 2**25  # float32 values: 128 MB
torch.ones(block)  # allocated and freed
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults))
"""
PAGES = 2**27 // 4096  # a 128 MB block faulted in anew


@pytest.mark.parametrize("parsed, env, reused", [
    ("sft", {}, True),
    ("nothing", {}, False),  # the measurement tells the two apart
    ("sft", {"MALLOC_MMAP_THRESHOLD_": str(2**25)}, False),  # the user's own setting wins
])
def test_freed_blocks_are_reused_by_a_cpu_training_run(tmp_path, parsed, env, reused):
    out = subprocess.run([sys.executable, "-c", REALLOCATE, parsed, str(tmp_path / "out")], cwd=ROOT, text=True,
                         env=fresh_env(CUDA_VISIBLE_DEVICES="", **env), capture_output=True, timeout=300, check=True)
    faults = int(out.stdout.split()[-1])
    assert (faults < PAGES // 10) if reused else (faults > PAGES // 2), faults
