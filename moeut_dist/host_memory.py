"""Freed host memory kept for the next step: glibc's malloc tuned for tensors on the CPU.

PyTorch has no caching allocator for CPU tensors. glibc serves an allocation above its mmap
threshold (dynamic, at most 32 MB) with a fresh `mmap` and unmaps it when it is freed, so a large
tensor made anew every step (a weight gradient, a padded expert layout) costs a page fault per
4 KB page the first time it is written. At the MoEUT-44M shapes that doubled the time of a
σ-MoE weight-gradient `bmm` (13 against 6 ms: `bench/kernels.py`), depending on how the
dynamic threshold happened to stand. With the thresholds raised, freed blocks stay in the heap
and the next step's tensors of the same sizes reuse them, as CUDA's caching allocator does.

A `moeut train` step of MoEUT-44M on 2 CPU threads made 360,000–720,000 page faults and took
3.0–3.4 s; with freed memory kept, none and 2.5–2.8 s. The cost is memory: freed blocks stay
mapped, and glibc places the first few repeats of a large aligned allocation apart before freed
blocks coalesce, so the resident size settles 10–20% above the default's peak (2.2–2.4 against
2.05 GB there), after a few steps.
"""

from __future__ import annotations

import ctypes
import sys

# Allocations up to this size come from the heap, and this much free memory at its top is kept.
RETAINED_BYTES = 1 << 30

# mallopt's parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Make this process's malloc keep freed memory for reuse (see the module docstring).
    Returns whether it took effect: False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the C library this process runs on
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: other tunables
        return False
    return all(
        libc.mallopt(parameter, RETAINED_BYTES) == 1  # mallopt returns 1 on success
        for parameter in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD)
    )
