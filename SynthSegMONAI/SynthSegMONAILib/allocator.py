"""glibc's allocator tuned for the network's slabs (Linux; nothing elsewhere).

Every slab of the streamed network allocates tens of MB of temporaries. glibc serves requests
above its mmap threshold (32 MB at most, by default) with fresh ``mmap`` calls and returns them
on ``free``: the kernel then zeroes every page again at first touch, which measured 5 to 10 page
faults per byte computed and about a quarter of a 256^3 run's CPU time as system time. Raising
the mmap and trim thresholds keeps freed slabs in the heap for the next ones;
:func:`release_freed_memory` hands the kept memory back between the network's stages (whose
slabs differ in size) and once a run is done, so that the peak memory stays that of one stage.

NumPy marks each large array it allocates for transparent huge pages (``madvise``). With the
raised threshold those arrays come from the heap, whose addresses the slabs then reuse: every
page handed back and touched again came back as a 2 MiB page, zeroed whole. That cost 3.5 to
9 s of system time in a 256^3 run (18 % of a ``--fast`` run's CPU samples in the kernel's page
clearing), so the tuning turns NumPy's marking off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  #: allocations below 1 GiB come from the heap (larger ones: the posteriors)
TRIM_THRESHOLD = 256 << 20  #: free memory at the heap's top is kept up to 256 MiB


def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Serve allocations under 1 GiB from the heap and keep freed memory for reuse, and leave
    NumPy's arrays out of huge pages; True if done."""
    libc = _libc()
    if libc is None:
        return False
    tuned = bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(MMAP_THRESHOLD))) and \
        bool(libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(TRIM_THRESHOLD)))
    if tuned:
        set_numpy_huge_pages(False)
    return tuned


def set_numpy_huge_pages(enabled: bool) -> bool | None:
    """Turn NumPy's huge-page marking of large arrays on or off; returns the previous setting
    (None where this NumPy has no such switch)."""
    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy 1.x
        from numpy.core import multiarray
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    return None if setter is None else bool(setter(enabled))


def release_freed_memory() -> None:
    """Return the heap's free memory to the system (``malloc_trim``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(ctypes.c_size_t(0))
