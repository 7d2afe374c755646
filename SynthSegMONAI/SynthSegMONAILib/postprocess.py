"""SynthSeg's topology-aware postprocessing, on posteriors laid out (X, Y, Z, C).

SynthSeg's own arrays are (X, Y, Z, C) too, so the channel sums and the argmax here reduce
the same contiguous runs of values as its NumPy code does. Float16 posteriors (stored so to
save memory) are compared, summed and renormalised in float32. The work is done in few passes
over the posteriors, each in blocks of rows shared between threads (NumPy releases the GIL):

1. one pass computes the whole-brain mask (sum of channels 1.. above the threshold) and,
   per voxel, one bit per channel above the threshold, with each class's bounding box;
2. the largest connected component of the brain, then of each topological class inside its
   own bounding box (SciPy, 6-connectivity), set one "keep" bit per class and voxel;
3. one pass zeroes what is not kept, renormalises and takes the argmax.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy.ndimage import label as connected_components

from .half_float import as_float32, store

Box = tuple[slice, slice, slice]
ROWS_PER_BLOCK = 4  #: rows of the first axis per block of work (a few MB of posteriors at 256^2)


def bounding_box(mask: np.ndarray) -> Box | None:
    """The smallest box holding every True voxel of a 3D mask (None when empty)."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 6-connected component (ties: the first in raster order); empty stays empty."""
    keep = np.zeros_like(mask)
    box = bounding_box(mask)  # label only the mask's bounding box: same components, same order
    if box is None:
        return keep
    components, _ = connected_components(mask[box])
    keep[box] = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
    return keep


def for_row_blocks(n: int, work: Callable[[int, int], object], threads: int = 1,
                   rows: int = ROWS_PER_BLOCK) -> list:
    """``work(a, b)`` for consecutive blocks [a, b) of ``n`` rows, on ``threads`` threads; results in order."""
    blocks = [(a, min(a + rows, n)) for a in range(0, n, rows)]
    if threads <= 1 or len(blocks) < 2:
        return [work(a, b) for a, b in blocks]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda ab: work(*ab), blocks))


def _brain_above(q: np.ndarray, threshold: float, out: np.ndarray) -> None:
    """Sum of the non-background channels > threshold, for a float32 block."""
    np.greater(q[..., 1:].sum(axis=-1), np.float32(threshold), out=out)


def brain_mask(post: np.ndarray, threshold: float, threads: int = 1) -> np.ndarray:
    """Largest component of "sum of the non-background channels > threshold" of (X, Y, Z, C) posteriors."""
    mask = np.empty(post.shape[:3], dtype=bool)

    def block(a: int, b: int) -> None:
        _brain_above(as_float32(post[a:b]), threshold, mask[a:b])

    for_row_blocks(post.shape[0], block, threads)
    return largest_component(mask)


class _ChannelBits:
    """Per voxel, one bit per channel 1.. of posteriors above a threshold, packed in an integer
    (channels 1..C-1 fit when C <= 65), and per bit the projections of its voxels on each axis;
    with the brain's raw mask (:func:`brain_mask` before its largest component) in the same pass."""

    def __init__(self, post: np.ndarray, threshold: float, threads: int):
        n_bits = post.shape[-1] - 1
        self.nbytes = next(b for b in (1, 2, 4, 8) if 8 * b >= n_bits)
        self.bits = np.empty(post.shape[:3], dtype=f"<u{self.nbytes}")
        self.brain = np.empty(post.shape[:3], dtype=bool)
        shape = post.shape[:3]

        def block(a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            q = as_float32(post[a:b])
            _brain_above(q, threshold, self.brain[a:b])
            packed = np.packbits(q[..., 1:] > np.float32(threshold), axis=-1, bitorder="little")
            if packed.shape[-1] < self.nbytes:
                packed = np.concatenate([packed, np.zeros((*packed.shape[:3], self.nbytes - packed.shape[-1]),
                                                          dtype=np.uint8)], axis=-1)
            bits = packed.view(self.bits.dtype)[..., 0]
            self.bits[a:b] = bits
            return (np.bitwise_or.reduce(bits, axis=(1, 2)), np.bitwise_or.reduce(bits, axis=(0, 2)),
                    np.bitwise_or.reduce(bits, axis=(0, 1)))

        parts = for_row_blocks(shape[0], block, threads)
        self.rows = np.concatenate([p[0] for p in parts])
        self.cols = np.bitwise_or.reduce(np.stack([p[1] for p in parts]), axis=0)
        self.depth = np.bitwise_or.reduce(np.stack([p[2] for p in parts]), axis=0)

    def mask_of(self, channels: np.ndarray) -> int:
        """The integer whose bits are those of ``channels`` (channel numbers, 1..)."""
        return int(sum(1 << (int(c) - 1) for c in channels))

    def box_of(self, bits: int) -> Box | None:
        """Bounding box of the voxels having any of ``bits``."""
        box = []
        for proj in (self.rows, self.cols, self.depth):
            hits = np.flatnonzero(proj & proj.dtype.type(bits))
            if hits.size == 0:
                return None
            box.append(slice(int(hits[0]), int(hits[-1]) + 1))
        return tuple(box)


def _intersect(a: Box, b: Box) -> Box | None:
    box = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b))
    return None if any(s.stop <= s.start for s in box) else box


def _finish(post: np.ndarray, index: np.ndarray,
            keep_channel: Callable[[int, int, np.ndarray], np.ndarray | None], threads: int) -> None:
    """Per block of rows: zero where ``keep_channel(a, b, values)`` (bool (rows, Y, Z, C), or
    None: keep all) is False, divide by the channel sum, argmax into ``index``."""

    def block(a: int, b: int) -> None:
        p = post[a:b]
        q = as_float32(p)
        keep = keep_channel(a, b, q)
        if keep is not None:
            np.copyto(q, 0, where=~keep)
        q /= q.sum(axis=-1, keepdims=True)
        index[a:b] = q.argmax(axis=-1)
        if q is not p:
            store(p, q)

    for_row_blocks(post.shape[0], block, threads)


def postprocess_default(post: np.ndarray, topological_classes: np.ndarray, crop: Box,
                        threshold: float = 0.25, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """SynthSeg's default mode, on the PADDED (X, Y, Z, C) posteriors; renormalises the unpadded
    part (``crop``) in place and returns it with its argmax channel.

    Keep the largest component of the brain (sum of non-background > threshold), then for
    each topological class (0 is never touched) the largest component of its channels'
    union above threshold. Padding is removed last.
    """
    classes = [np.flatnonzero(topological_classes == c) for c in np.unique(topological_classes)[1:]]
    if post.shape[-1] > 65 or len(classes) > 62:
        return _postprocess_default_by_class(post, classes, crop, threshold, threads)
    above = _ChannelBits(post, threshold, threads)
    brain = largest_component(above.brain)
    # keep bits: one per class, then "brain" and "always" (background)
    word = np.uint64 if len(classes) > 30 else np.uint32
    brain_bit, always_bit = len(classes), len(classes) + 1
    keep = (brain.astype(word) << word(brain_bit)) | word(1 << always_bit)
    brain_box = bounding_box(brain)
    for k, channels in enumerate(classes):
        bits = above.mask_of(channels)
        box = above.box_of(bits)
        box = box and brain_box and _intersect(box, brain_box)
        if box is None:
            continue
        union = (above.bits[box] & above.bits.dtype.type(bits)) != 0
        union &= brain[box]
        keep[box] |= largest_component(union).astype(word) << word(k)
    del brain, above
    shift = np.full(post.shape[-1], brain_bit, dtype=word)  # class 0 (CSF): the brain mask only
    shift[0] = always_bit
    for k, channels in enumerate(classes):
        shift[channels] = k
    one = word(1)
    post = post[(*crop, slice(None))]
    keep = keep[crop]
    index = np.empty(post.shape[:3], dtype=np.int32)
    _finish(post, index, lambda a, b, q: ((keep[a:b, ..., None] >> shift) & one).astype(bool), threads)
    return post, index


def _postprocess_default_by_class(post: np.ndarray, classes: list[np.ndarray], crop: Box, threshold: float,
                                  threads: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`postprocess_default` one class at a time (models with more than 64 channels)."""
    brain = brain_mask(post, threshold, threads)
    post[~brain, 1:] = 0
    del brain
    for channels in classes:
        union = np.zeros(post.shape[:3], dtype=bool)
        for c in channels:
            union |= as_float32(post[..., c]) > np.float32(threshold)
        kept = largest_component(union)
        for c in channels:
            post[..., c] *= kept
    post = post[(*crop, slice(None))]
    index = np.empty(post.shape[:3], dtype=np.int32)
    _finish(post, index, lambda a, b, q: None, threads)
    return post, index


def postprocess_fast(post: np.ndarray, crop: Box, threshold: float = 0.25, low: float = 0.2,
                     threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """SynthSeg's ``--fast`` mode: unpad, keep the brain's largest component, zero values <= low
    (after the component step); renormalises in place and returns the posteriors with their argmax."""
    post = post[(*crop, slice(None))]
    brain = brain_mask(post, threshold, threads)
    background = np.ones(post.shape[-1], dtype=bool)
    background[1:] = False

    def keep(a: int, b: int, q: np.ndarray) -> np.ndarray:
        return (brain[a:b, ..., None] & (q > np.float32(low))) | background

    index = np.empty(post.shape[:3], dtype=np.int32)
    _finish(post, index, keep, threads)
    return post, index
