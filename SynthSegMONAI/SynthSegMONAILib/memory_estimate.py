"""Memory a run will need, estimated from headers and metadata before anything is allocated.

A scan or a model file from elsewhere can declare sizes that its bytes do not hold (a 500 KB
``.nii.gz`` declaring 800^3 voxels, 20 mm voxels that become a 1280^3 grid at 1 mm, a model
of 200 features): the engine reads the declared sizes, estimates the arrays the run will
hold at its fullest, and refuses what exceeds the memory available or the size limits below,
saying how much it would need.

The estimate of a segmentation is the largest, over the run's phases (loading, resampling,
network, postprocessing, writing), of the arrays alive together, plus the network's slab
temporaries and a margin for the allocator. The memory available is the smallest of the
system's available memory, the container's (cgroup) limit and the process's address-space
and data-size limits (``ulimit -v``, ``ulimit -d``), less what the process already uses.
"""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ResourceLimitError

MAX_GRID_SIDE = 512  #: voxels per side of the 1 mm grid, and of the network's padded input
MARGIN = 384 * 2**20  #: allocator slack, thread stacks and arenas, small temporaries
SLAB_FACTOR = 2  #: slab temporaries alive at once, in slab budgets (with MARGIN: above every peak measured)
GIB = 2**30


def format_bytes(n: float) -> str:
    """``n`` bytes in GiB (or MiB under 1 GiB), one decimal."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _proc_kib(path: str, field: str) -> int | None:
    """A ``field: N kB`` value of a /proc file, in bytes."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> tuple[int | None, str]:
    """Bytes this process can still allocate, and what sets that bound (None: unknown)."""
    bounds: list[tuple[int, str]] = []
    avail = _proc_kib("/proc/meminfo", "MemAvailable")
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = None
    if avail is not None:
        bounds.append((avail, "memory available on this machine"))
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:
            bounds.append((max(0, limit - usage), "the container's memory limit"))
            break
    for rlimit, field, name in ((resource.RLIMIT_AS, "VmSize", "the address-space limit (ulimit -v)"),
                                (getattr(resource, "RLIMIT_DATA", None), "VmData",
                                 "the data-size limit (ulimit -d)")):
        if rlimit is None:
            continue
        soft = resource.getrlimit(rlimit)[0]
        used = _proc_kib("/proc/self/status", field)
        if soft != resource.RLIM_INFINITY and used is not None:
            bounds.append((max(0, soft - used), name))
    if not bounds:
        return None, "unknown"
    return min(bounds)


def check_fits(needed: int, what: str, advice: str | Callable[[int], str] = "",
               available: int | None = None) -> None:
    """Raise :class:`ResourceLimitError` when ``needed`` bytes exceed the memory available
    (``available``, or :func:`available_memory`); ``advice`` may be computed from what is available."""
    source = "free GPU memory"
    if available is None:
        available, source = available_memory()
    if available is not None and needed > available:
        hint = advice(available) if callable(advice) else advice
        raise ResourceLimitError(f"{what} needs about {format_bytes(needed)} of memory, but only "
                                 f"{format_bytes(available)} is available (bound: {source})"
                                 + (f"; {hint}" if hint else ""))


@dataclass(frozen=True)
class RunShapes:
    """Array shapes of one segmentation, known from the header before any voxel is read."""

    stored_values: int  #: values in the file (every channel)
    stored_itemsize: int  #: bytes per stored value
    input_shape: tuple[int, int, int]
    resampling: tuple[tuple[int, int, int], ...]  #: the separable resampling's successive shapes; () if none
    grid_shape: tuple[int, int, int]  #: the (1 mm) grid the network's input is cut from
    crop_shape: tuple[int, int, int]
    padded_shape: tuple[int, int, int]


def segmentation_bytes(s: RunShapes, out_channels: int, level_features: list[int], slab_budget: int,
                       posteriors: bool, input_grid: bool, on_gpu: bool = False, posterior_bytes: int = 4,
                       activation_bytes: int = 4) -> int:
    """Host memory, in bytes, that segmenting an image of shapes ``s`` needs at its fullest.

    ``posterior_bytes`` and ``activation_bytes`` are the sizes of the posteriors' and of the
    network's activations' values (4: float32; 2: float16 posteriors, bfloat16 activations).
    The padded shape is the whole volume's: auto-crop, known only once the image is read, can
    only make the run smaller.
    """
    v_in, v_grid = math.prod(s.input_shape), math.prod(s.grid_shape)
    v_crop, v_pad = math.prod(s.crop_shape), math.prod(s.padded_shape)
    c = out_channels
    resampled = bool(s.resampling)
    # loading: the stored values, their float64 conversion and scaling, one channel picked
    load = s.stored_values * (s.stored_itemsize + 16) + 8 * v_in
    # resampling: image, its blur, and five arrays of the largest step of the linear interpolation
    widest = max((math.prod(shape) for shape in s.resampling), default=0)
    resample = 16 * v_in + 40 * widest
    kept = 8 * v_grid if resampled else 0  # the resampled image waits for --resample
    # after resampling: image, resampled, its RAS copy, then the normalised crop and its padding
    prepare = 8 * v_in + kept + 8 * v_grid + max(24 * v_crop, 12 * v_pad)
    skips = sum(activation_bytes * f * v_pad // 8**i for i, f in enumerate(level_features[1:-1], start=1))
    network_input = 4 * v_pad
    post = posterior_bytes * c * v_pad
    network = kept + network_input + post + (0 if on_gpu else skips + SLAB_FACTOR * slab_budget)
    # postprocessing: masks, component labels, argmax and the RAS segmentation
    postprocess = kept + network_input + post + 14 * v_pad + 8 * v_crop + 4 * v_grid
    cropped = s.crop_shape != s.grid_shape
    write = kept + network_input + post + 12 * v_grid
    if cropped and (posteriors or (input_grid and resampled)):
        write += 4 * c * v_grid  # the posteriors of the whole grid
    if input_grid and resampled:  # one channel at a time brought back to the input's grid
        write += 4 * v_grid + 20 * max(v_grid, v_in) + 8 * v_in
        if posteriors:
            write += 4 * c * v_in
    if resampled:
        write += 8 * v_grid  # the writer's copy of the resampled image
    return max(load, resample, prepare, network, postprocess, write) + MARGIN


def gpu_network_bytes(s: RunShapes, out_channels: int, level_features: list[int], slab_budget: int,
                      posterior_bytes: int = 4, activation_bytes: int = 4) -> int:
    """GPU memory, in bytes, of the network's pass on an image of shapes ``s``."""
    v_pad = math.prod(s.padded_shape)
    skips = sum(activation_bytes * f * v_pad // 8**i for i, f in enumerate(level_features[1:-1], start=1))
    return 4 * v_pad + posterior_bytes * out_channels * v_pad + skips + SLAB_FACTOR * slab_budget + MARGIN


def check_grid(shape: tuple[int, ...], what: str, path: os.PathLike | str, advice: str) -> None:
    """Refuse a grid with a side over :data:`MAX_GRID_SIDE`."""
    if max(shape) > MAX_GRID_SIDE:
        dims = "x".join(str(int(n)) for n in shape)
        raise ResourceLimitError(f"{path}: {what} would be {dims} voxels, over the limit of "
                                 f"{MAX_GRID_SIDE} voxels per side; {advice}")
