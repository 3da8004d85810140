"""Host memory policy for long-running JAX processes on CPU: keep freed memory for reuse.

XLA:CPU allocates one temporary buffer per run of an executable (about 500 MB for the Swin-B
segmenter's training step at 128 px, several GB at 640 px) with `posix_memalign`, on one of its
thread-pool threads. glibc serves a block that large from a fresh `mmap` (a thread's arena
cannot hold it) and unmaps it when freed, so every step touches new pages and the kernel faults
and zeroes them again: 125,000 page faults per 128 px Swin-B step, 0.3-4 s of system time on this
project's machine, as long as the step's computation. `keep_freed_memory()` makes glibc serve
every thread from its main heap (one arena), never `mmap` large blocks, and never give freed
memory back, so a step reuses the previous step's pages and, once the heap has settled (the first
few steps: a step may allocate before the previous one has freed), faults none. The process then
keeps its peak memory, as torch's and JAX's accelerator allocators do.

The command-line tools call it first thing; `OVSEG_KEEP_FREED_MEMORY=0` turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

# glibc <malloc.h> mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_applied = False


def keep_freed_memory() -> bool:
    """Set glibc's allocator to reuse freed memory (see the module docstring) -> whether it is set.
    Call before the first JAX computation (XLA's threads take their arena when they first allocate);
    a no-op returning False off Linux/glibc or with `OVSEG_KEEP_FREED_MEMORY=0`."""
    global _applied
    if _applied:
        return True
    if os.environ.get("OVSEG_KEEP_FREED_MEMORY", "1").lower() in ("0", "false", "no", "off"):
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # -1: never trim (mallopt(3))
    _applied = all(mallopt(param, value) == 1 for param, value in settings)
    if not _applied:
        log.warning("glibc mallopt refused a setting; XLA:CPU steps will page-fault their buffers afresh")
    return _applied
