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

Within a stage the heap fragments: slabs of different sizes (a level's convolution windows, its
outputs, the pooled rows waiting for the next level) free holes that the next request does not
fit, and the heap grows past what is in use. On a 208x240x256 input the flip pass's encoder held
0.6-0.9 GB of freed memory beside 0.7 GB in use. :class:`FreedMemoryBound` hands the freed
memory back when more than an allowance of it accumulates near the process's peak, checked
after every slab.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import torch

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


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


_PAGE = 4096
MADV_DONTNEED = 4
_discarded = 0  # bytes handed back by discard_pages since the last release


def discard_pages(t: torch.Tensor) -> int:
    """Hand back to the system the whole pages inside a contiguous CPU tensor's memory, which its
    owner will not read again (they read as zeros if it does); returns the bytes handed back.

    Lets a stream drop the rows of a large buffer it has consumed before the buffer is freed.
    """
    global _discarded
    libc = _libc()
    dense = t.is_contiguous() or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))
    if libc is None or t.device.type != "cpu" or not dense or t.numel() == 0:
        return 0
    start = t.data_ptr()
    lo = -(-start // _PAGE) * _PAGE
    hi = (start + t.numel() * t.element_size()) // _PAGE * _PAGE
    if hi <= lo or libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED) != 0:
        return 0
    _discarded += hi - lo
    return hi - lo


def _resident() -> tuple[int, int] | None:
    """This process's resident bytes: all of them, and those not backed by files (``/proc/self/statm``)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
        return int(fields[1]) * _PAGE, (int(fields[1]) - int(fields[2])) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _high_water() -> int | None:
    """The most bytes this process has held resident (``VmHWM``)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class FreedMemoryBound:
    """Keeps the heap's fragmentation from raising the process's peak memory by more than
    ``allowance`` bytes.

    Resident freed memory is estimated as the growth of the process's anonymous resident memory
    (plus the pages :func:`discard_pages` handed back) beyond what the allocator has handed out
    (``mallinfo2``: heap chunks in use and mapped chunks) and was written (large buffers are
    touched when made, or their unwritten bytes counted by :meth:`untouched`). What the first
    slab after a release frees is its temporaries, which the next slabs reuse; what accumulates
    beyond them is fragmentation.

    :meth:`check` (after each slab) releases when that fragmentation exceeds the allowance while
    the process is within one slab's temporaries and the allowance of its high-water mark
    (``VmHWM``): elsewhere the freed memory stays, since the next slabs would fault every page of
    it in again (about 0.1 s of system time per 256 MB). :meth:`release` (between stages) always
    does.
    """

    def __init__(self, allowance: int = 128 << 20):
        self.allowance = allowance
        self._libc = _libc()
        self.releases = 0  #: how many times :meth:`check` handed freed memory back
        self._base: int | None = None  # measured from the first release
        self._working: int | None = None  # one slab's temporaries, measured after each release
        self._untouched = 0
        if self._libc is not None and hasattr(self._libc, "mallinfo2"):
            self._libc.mallinfo2.restype = _MallInfo2
        else:
            self._libc = None  # glibc before 2.33: no mallinfo2, nothing to measure with

    @property
    def active(self) -> bool:
        """Whether the bound can be measured here (Linux, glibc 2.33 or later)."""
        return self._libc is not None

    def _freed(self) -> tuple[int, int] | None:
        """(resident bytes, resident bytes not handed out by the allocator)."""
        resident = _resident()
        if resident is None or self._libc is None:
            return None
        info = self._libc.mallinfo2()
        return resident[0], resident[1] + _discarded + self._untouched - info.uordblks - info.hblkhd

    def untouched(self, delta: int) -> None:
        """Count ``delta`` more bytes handed out by the allocator but not yet written (so not resident)."""
        self._untouched += delta

    def release(self) -> None:
        """Hand every freed byte back now, and measure from here."""
        global _discarded
        release_freed_memory()
        _discarded = 0  # pages discarded in chunks since freed: counted as freed memory until now
        now = self._freed()
        self._base = None if now is None else now[1]
        self._working = None  # the next slab's temporaries, once freed

    def check(self) -> None:
        """Hand freed memory back if more than the allowance of it accumulates near the peak."""
        if self._base is None:
            return
        now = self._freed()
        if now is None:
            return
        if self._working is None:  # one slab's temporaries, freed: the next slabs reuse them
            self._working = max(0, now[1] - self._base)
            return
        if now[1] - self._base - self._working <= self.allowance:
            return
        # between slabs the process is one slab's temporaries under its peak within a stage
        high = _high_water()
        if high is not None and now[0] > high - self._working - self.allowance:
            self.releases += 1
            self.release()
