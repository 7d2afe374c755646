"""Auto-crop: the network runs on the head's bounding box, not on the whole padded volume.

A 256^3 scan is mostly air and neck; the network's cost is proportional to its input's
volume. Without ``--crop``, SynthSeg pads the normalised RAS volume to multiples of 32 (and
at least ``min_pad``) and runs the network on all of it. Auto-crop runs it on a block of that
padded volume instead: the head's bounding box plus a margin, rounded up to a multiple of
the network's own size multiple (2^4 for 5 levels; tighter than SynthSeg's 32, which only
pads) and never under ``min_pad``, and starting at a multiple of the network's pooling factor in the
padded volume's coordinates, so that every max-pooling sees the same 2x2x2 blocks as in the
whole-volume run. Inside the block the network then computes what it computes on the whole
volume, except for the context it no longer sees beyond the block (air, below the threshold);
everything outside is background, as SynthSeg's postprocessing makes it anyway.

The normalisation is unchanged (percentiles of the whole volume). Images whose padded volume
is already ``min_pad`` on every axis (all of SynthSeg's small test crops) are never cropped:
their result is the whole-volume run's, bit for bit.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import label as connected_components

from .preprocess import round_up

Span = tuple[int, int]  #: [start, stop) along one axis

HEAD_THRESHOLD = 0.1  #: normalised intensity above which a voxel counts as head
COARSE = 4  #: the head's components are found on a grid this many times coarser
MIN_PART = 0.05  #: components smaller than this fraction of the largest one are ignored (markers, noise)
MARGIN = 8  #: voxels added on each side of the head's bounding box


def head_spans(norm: np.ndarray, threshold: float = HEAD_THRESHOLD, min_part: float = MIN_PART
               ) -> tuple[Span, Span, Span] | None:
    """The head's bounding box in a normalised 3D volume, as [start, stop) per axis.

    The voxels above ``threshold``, less the connected parts (on a grid ``COARSE`` times
    coarser, where a coarse voxel is set when any of its voxels is) smaller than ``min_part``
    of the largest one: detached markers and bright noise do not stretch the box. None when
    no voxel is above the threshold.
    """
    mask = np.pad(norm > threshold, [(0, -n % COARSE) for n in norm.shape])
    shape6 = [k for n in mask.shape for k in (n // COARSE, COARSE)]
    fine = mask.reshape(shape6)  # (X/4, 4, Y/4, 4, Z/4, 4): each coarse voxel's own voxels
    coarse = fine.any(axis=(1, 3, 5))
    parts, count = connected_components(coarse)
    if count == 0:
        return None
    sizes = np.bincount(parts.ravel())
    sizes[0] = 0
    kept = sizes >= min_part * sizes.max()
    head = fine & kept[parts][:, None, :, None, :, None]
    spans = []
    for axis in range(3):
        others = tuple(a for a in range(6) if a not in (2 * axis, 2 * axis + 1))
        hits = np.flatnonzero(head.any(axis=others).ravel())
        spans.append((int(hits[0]), min(int(hits[-1]) + 1, norm.shape[axis])))
    return tuple(spans)


def field_span(n: int, padding: Span, head: Span, margin: int, multiple: int, align: int,
               min_size: int) -> Span:
    """The network's input along one axis, in the coordinates of the whole padded axis (of
    ``n + padding[0] + padding[1]`` voxels): it holds the head span plus ``margin``, its length
    is a multiple of ``multiple`` and at least ``min_size`` (rounded up), its start a multiple
    of ``align``. The whole padded axis when nothing smaller fits."""
    full = n + padding[0] + padding[1]
    want = (max(head[0] - margin + padding[0], 0), min(head[1] + margin + padding[0], full))
    length = max(round_up(want[1] - want[0], multiple), round_up(min_size, multiple))
    while length < full:
        centred = (want[0] + want[1] - length) // 2 // align * align
        for start in (centred, want[0] // align * align):
            start = min(max(start, 0), (full - length) // align * align)
            if start <= want[0] and start + length >= want[1]:
                return start, start + length
        length += multiple
    return 0, full


def network_field(norm: np.ndarray, padding: tuple[Span, Span, Span], multiple: int, align: int,
                  min_size: int, margin: int = MARGIN) -> tuple[Span, Span, Span]:
    """The auto-crop field of a normalised volume whose whole padded version has ``padding``
    (see :func:`field_span`); the whole padded volume when no head is found."""
    head = head_spans(norm)
    full = tuple((0, n + lo + hi) for n, (lo, hi) in zip(norm.shape, padding))
    if head is None:
        return full
    return tuple(field_span(n, pad, h, margin, multiple, align, min_size)
                 for n, pad, h in zip(norm.shape, padding, head))


def crop_of_field(shape: tuple[int, ...], padding: tuple[Span, Span, Span], field: tuple[Span, Span, Span]
                  ) -> tuple[tuple[slice, slice, slice], tuple[Span, Span, Span]]:
    """The block of the (unpadded) volume a field covers, and the zero padding it adds around it."""
    box, pads = [], []
    for n, (lo, _), (start, stop) in zip(shape, padding, field):
        a, b = start - lo, stop - lo  # in the volume's own coordinates
        box.append(slice(max(a, 0), min(b, n)))
        pads.append((max(0, -a), max(0, b - n)))
    return tuple(box), tuple(pads)
