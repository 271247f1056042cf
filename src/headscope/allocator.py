"""Keep freed memory for reuse instead of handing it back to the kernel after every tensor.

glibc serves every allocation above its mmap threshold (128 KiB, rising to at most 32 MiB) with a fresh
``mmap`` and returns it with ``munmap`` when freed, so each new large tensor page-faults its memory in
again (zero-filled by the kernel). :func:`tune_allocator` raises the mmap threshold to 1 GiB and the trim
threshold to 2 GiB (``mallopt``), so freed blocks are reused from the heap. What it buys, measured on the
2-core machine (README): page faults 14–18× fewer everywhere; wall time unchanged on plain forward passes
(``bench/allocator.py``: 0.96–1.12× in three paired runs); on the lens stages, whose vocabulary-sized
logit blocks (hundreds of MB each) are always mmapped by default, lens.eval 65–66 s → 41 s and lens.train
63 → 51 s in the demo (one run each way); the whole demo 589 s without, 546 s with (one run each, on a
machine whose speed drifts). The price is that up to ~2 GiB freed memory stays with the process.

The ``headscope`` command calls it at start; ``HEADSCOPE_MALLOC=default`` leaves glibc's defaults. A
library user can call it once. Elsewhere than Linux/glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 2**30
TRIM_THRESHOLD = 2**31 - 1


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds (see the module docstring); True when they were set."""
    if os.environ.get("HEADSCOPE_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):   # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
