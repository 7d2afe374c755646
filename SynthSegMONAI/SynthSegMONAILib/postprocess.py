"""SynthSeg's topology-aware postprocessing, on posteriors laid out (C, X, Y, Z)."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import label as connected_components


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 6-connected component (ties: the first in raster order); empty stays empty."""
    keep = np.zeros_like(mask)
    # label only the mask's bounding box: same components, same raster order, less work
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return keep
        box.append(slice(hits[0], hits[-1] + 1))
    components, _ = connected_components(mask[tuple(box)])
    keep[tuple(box)] = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
    return keep


def _brain_mask(post: np.ndarray, threshold: float) -> np.ndarray:
    return largest_component(post[1:].sum(axis=0) > threshold)


def postprocess_default(post: np.ndarray, topological_classes: np.ndarray,
                        crop: tuple[slice, slice, slice], threshold: float = 0.25) -> np.ndarray:
    """SynthSeg's default mode, in place on the PADDED posteriors; returns the unpadded view.

    Keep the largest component of the brain (sum of non-background > threshold), then for
    each topological class (0 is never touched) the largest component of its channels'
    union above threshold. Padding is removed last.
    """
    brain = _brain_mask(post, threshold)
    post[1:] *= brain
    del brain
    # classes have disjoint channels, so each class's mask can be taken when it is needed
    for cls in np.unique(topological_classes)[1:]:
        channels = np.where(topological_classes == cls)[0]
        union = post[channels[0]] > threshold
        for c in channels[1:]:
            union |= post[c] > threshold
        keep = largest_component(union)
        for c in channels:
            post[c] *= keep
    return post[(slice(None), *crop)]


def postprocess_fast(post: np.ndarray, crop: tuple[slice, slice, slice], threshold: float = 0.25,
                     low: float = 0.2) -> np.ndarray:
    """SynthSeg's ``--fast`` mode: unpad, keep the brain's largest component, zero values <= low."""
    post = post[(slice(None), *crop)]
    post[1:] *= _brain_mask(post, threshold)
    for channel in post[1:]:  # one channel at a time: no volume-sized temporaries
        channel *= channel > low
    return post


def normalise_and_argmax(post: np.ndarray, chunk: int = 16) -> np.ndarray:
    """Divide by the channel sum in place and return the argmax channel (first max wins)."""
    index = np.empty(post.shape[1:], dtype=np.int32)
    for a in range(0, post.shape[1], chunk):
        block = post[:, a:a + chunk]
        block /= block.sum(axis=0)[None]
        index[a:a + chunk] = block.argmax(axis=0)
    return index
