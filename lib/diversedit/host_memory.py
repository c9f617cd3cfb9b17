"""Host allocator settings for training on the CPU: keep freed memory in the process.

glibc's malloc hands large freed blocks back to the kernel (blocks it mmapped, and the top of
the heap above its trim threshold), so a CPU training step, which allocates its activations and
temporaries afresh, pays minor page faults for them on every step: about 25 MiB for a tiny SiT
step and 150 MiB for DiverseDiT's, most of what the CPU benchmark had measured as the
additions' overhead (``results/bench/NOTES.md``, entries 16 and 20). Here nothing is mmapped
(glibc's mmap threshold tops out at 32 MiB, below the diversity loss's stacked features from
SiT-S/2 at batch 8 up) and the heap is never trimmed. Keeping the memory costs a resident size
that stays at its peak, plus a few blocks of a step's largest sizes: glibc (2.36 here) pads
aligned requests, so a freed block is reused only once it merged with a free neighbour. A
user's own ``MALLOC_*_`` settings win, and
``DIVERSEDIT_KEEP_FREED_MEMORY=0`` leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # glibc's mallopt parameters
SETTINGS = (
    (M_MMAP_MAX, 0),  # every block from the heap, whatever its size (no mmap threshold)
    (M_TRIM_THRESHOLD, 2**31 - 1),  # never trim the heap's top (the largest int)
    (M_TOP_PAD, 64 << 20),  # grow the heap in 64 MiB steps
)
USER_KEYS = (
    "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"
)  # fmt: skip
OPT_OUT = "DIVERSEDIT_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for this process (and processes it forks).

    Returns False, changing nothing, where the C library is not glibc, the user set any of
    :data:`USER_KEYS`, or ``DIVERSEDIT_KEEP_FREED_MEMORY`` is ``0``.
    """
    if os.environ.get(OPT_OUT) == "0" or any(key in os.environ for key in USER_KEYS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)
