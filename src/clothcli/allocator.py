"""Keep freed memory in the process, so large CPU tensors do not page-fault on every step.

PyTorch's CPU allocator has no cache: it calls malloc and free. glibc serves every block above
its mmap threshold (at most 32 MB) with a fresh `mmap` and returns it with `munmap` on free, so
each training step gets its large activations (64 x 72 x 48 x 48 floats is 42 MB) as new pages
that the kernel must fault in and zero again. PyTorch's performance guide answers this with
jemalloc or tcmalloc preloaded; glibc can do the same itself through `mallopt`: serve every block
from the heap (`M_MMAP_MAX = 0`) and never trim the heap back to the system (`M_TRIM_THRESHOLD`).
The cost is that the process keeps its peak memory until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
OPT_OUT_ENV = "CLOTHCLI_SYSTEM_MALLOC"


def keep_freed_memory() -> bool:
    """Tune glibc's malloc to reuse freed blocks; True if it was applied.

    Does nothing on other C libraries and platforms, or when CLOTHCLI_SYSTEM_MALLOC=1. Processes
    forked afterwards (DataLoader workers) inherit the setting.
    """
    if os.environ.get(OPT_OUT_ENV, "") not in ("", "0") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
