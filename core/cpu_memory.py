"""The process's C allocator when a run trains on the CPU (`train.cpu_allocator`).

PyTorch's CPU tensors come from the C library's `malloc`. glibc serves a request above its
mmap threshold (128 KiB at start, raised as large blocks are freed, to at most 32 MiB) with a
fresh `mmap`, and gives the top of its heap back to the system whenever more than the trim
threshold is free there. A training step allocates and frees hundreds of activations of a few
MiB each, so with those defaults most of them land on pages the kernel must map and zero again:
on the tiny GPT-2 of `benchmarks/peers.py` about 20,000 page faults per step, 10-20 % of the
step's time.

`keep_freed_memory` fixes both thresholds (`mallopt`): blocks up to 32 MiB (the largest
threshold glibc's own rule reaches) come from the heap, and freed memory stays in the process
for the next step. The peak resident memory does not grow (the memory kept is what the step
already used at its peak); the arithmetic is unchanged (torch aligns every CPU buffer to 64
bytes whichever way it was obtained), so results are bit-identical. The setting is
process-wide and stays after the run: that is why it is a run option, `cpu_allocator: system`
leaves the allocator alone. Where the C library is not glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit machines
TRIM_THRESHOLD = 2**31 - 1  # in practice never: freed memory stays for the next step

_applied = False


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (above) once per process; True when they are set (now
    or before), False where the C library is not glibc or refuses."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    # The mmap threshold first: setting either one turns glibc's dynamic rule off.
    _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied


def applied() -> bool:
    """Whether `keep_freed_memory` has set the thresholds in this process."""
    return _applied
