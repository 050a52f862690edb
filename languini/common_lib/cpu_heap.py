"""Keep freed CPU memory in the process heap instead of handing it back to the OS after every step.

glibc serves big blocks straight from mmap (past a threshold that adapts up to 32 MiB) and trims the
top of its heap when it frees, so each training step of a CPU run maps fresh pages for its activations
and gradients and takes a page fault for every 4 KiB it first touches. On the 2-core development machine
that cost 30-50% of a nano training step (`languini throughput lstm nano`: 14k -> 20k tokens/s with the
heap kept). Fixed, high mmap and trim thresholds make the heap keep and reuse those pages: the process
holds on to its peak heap, as a GPU caching allocator does. Linux/glibc only; a no-op elsewhere and when
the user set MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ (glibc's own knobs) themselves.
"""

import ctypes
import ctypes.util
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers, from glibc's malloc.h
_KEEP_BYTES = 1 << 30  # blocks up to this size come from (and go back to) the heap


def keep_cpu_heap() -> bool:
    """Set glibc's thresholds so freed blocks stay in the heap; True when they were set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
