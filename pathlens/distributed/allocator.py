"""A worker process keeps the memory it frees, instead of handing it back to the OS after every chunk.

glibc's malloc serves each large block (a chunk's activations, MBs each) from a fresh mapping and unmaps it when
it is freed, so a process that allocates and frees the same activations chunk after chunk faults every page of
them in again each time: four chunks of the GPT-2-shape head sweep took ~560,000 minor page faults and 1.1 s of
system time out of 10.5 s of CPU on a Ray worker (about the same in the driver). A Ray worker runs nothing but
chunks, so `keep_freed_memory()` raises the size above which blocks get their own mapping to glibc's maximum and
stops trimming the heap: the same four chunks then fault ~40,000 times and spend 0.07 s in the kernel. The values
computed are the same bits (only where memory comes from changes); the worker's resident memory stays at its peak
between chunks, which a chunk budget (`max_memory=`) bounds anyway. Where the C library is not glibc it does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

MMAP_THRESHOLD = 32 * 2**20
"""Blocks of at most this many bytes come from the heap (glibc's largest threshold on 64-bit systems)."""
TRIM_THRESHOLD = 2**30
"""Free memory at the top of the heap up to this many bytes stays in the process."""
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Set this process's malloc to keep freed memory (module docstring); True if glibc took both settings."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
