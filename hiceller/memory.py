"""Process memory settings, applied once when a HiCeller command (or a launcher's rank) starts.

Training on real cells hands the allocator tensors of a different size at every step (packed
batches of 98 to 4,807 genes per cell). glibc's malloc serves a request above its mmap threshold
with its own mapping, returned to the system when freed, and everything below it from heaps that
only shrink from the top. The threshold starts at 128 KiB but rises to the size of each mapped block
that is freed (up to 32 MiB): after a few steps activations and gradients come from the heaps, whose
free space fragments between ever-changing sizes, and the process RSS climbs by about 1 MB per step
(bench/soak.py, bench/RESULTS.md). Setting the threshold fixes it where it starts (which also turns
the dynamic raise off): every block of 128 KiB or more is mapped and unmapped, so RSS follows what is
live. ``HICELLER_MALLOC=system`` leaves the C library's defaults (a comparison, or another allocator
preloaded such as jemalloc, which has its own policy).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_malloc", "MMAP_THRESHOLD"]

MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_applied: str | None = None


def tune_malloc() -> str:
    """Fix glibc's mmap threshold (module docstring); what was done, as one word."""
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get("HICELLER_MALLOC") == "system" or any(k.startswith("MALLOC_MMAP") for k in os.environ):
        _applied = "system"
    elif not sys.platform.startswith("linux"):
        _applied = "n/a"
    else:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.gnu_get_libc_version.restype = ctypes.c_char_p  # glibc only (musl has no such threshold)
            gnu = libc.gnu_get_libc_version()
        except (OSError, AttributeError):
            gnu = None
        if gnu is None:
            _applied = "n/a"
        else:
            _applied = "mmap_threshold" if libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 else "n/a"
    return _applied
