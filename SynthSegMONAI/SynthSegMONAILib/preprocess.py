"""SynthSeg's preprocessing as pure functions on (array, affine) pairs.

Each step returns new arrays; the order is SynthSeg's: resample to 1 mm, reorient to RAS,
crop, normalise, pad (SYNTHSEG_REFERENCE section 3 and the keras-synthseg README).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
from scipy.ndimage import gaussian_filter


@dataclass(frozen=True)
class Preprocessing:
    """What inference does around the network, as a model file's ``preprocessing`` metadata says
    (the defaults are SynthSeg's, the same as ``model_file.DEFAULT_PREPROCESSING``)."""

    target_resolution_mm: float = 1.0
    resample_tolerance_mm: float = 0.05
    intensity_percentiles: tuple[float, float] = (0.5, 99.5)
    min_pad: int = 128  #: the network's input is padded to at least this many voxels per axis
    posterior_smoothing_sigma: float | None = 0.5
    flip_averaging: bool = True
    mask_threshold: float = 0.25  #: postprocessing's posterior threshold
    fast_threshold: float = 0.2  #: ``--fast``: posteriors at or below it are zeroed

    @classmethod
    def from_dict(cls, settings: Mapping) -> Preprocessing:
        """From a model's (checked) metadata; missing settings take the defaults, unknown ones are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in settings.items() if k in known}
        if "intensity_percentiles" in values:
            lo, hi = values["intensity_percentiles"]
            values["intensity_percentiles"] = (float(lo), float(hi))
        for name in ("target_resolution_mm", "resample_tolerance_mm", "mask_threshold", "fast_threshold"):
            if name in values:
                values[name] = float(values[name])
        if values.get("posterior_smoothing_sigma") is not None:
            values["posterior_smoothing_sigma"] = float(values["posterior_smoothing_sigma"])
        if "min_pad" in values:
            values["min_pad"] = int(values["min_pad"])
        if "flip_averaging" in values:
            values["flip_averaging"] = bool(values["flip_averaging"])
        return cls(**values)

    def to_dict(self) -> dict:
        """The settings as model-file metadata (JSON types)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["intensity_percentiles"] = list(self.intensity_percentiles)
        return d


def needs_resampling(zooms: np.ndarray, target: float = 1.0, tolerance: float = 0.05) -> bool:
    """SynthSeg resamples when any HEADER voxel size lies outside target +- tolerance."""
    z = np.asarray(zooms[:3], dtype=float)
    return bool(np.any((z < target - tolerance) | (z > target + tolerance)))


@dataclass(frozen=True)
class ResampleGrid:
    """Where the resampled samples lie, in voxel coordinates of the original image."""

    start: np.ndarray  # per axis
    step: np.ndarray  # per axis (1 / factor)
    stop: np.ndarray  # per axis
    input_shape: tuple[int, int, int]

    def coordinates(self, axis: int) -> np.ndarray:
        """Sample positions along ``axis`` (clipped to the input as SynthSeg does)."""
        x = np.arange(start=self.start[axis], stop=self.stop[axis], step=self.step[axis])
        return np.clip(x, 0, self.input_shape[axis] - 1)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(len(self.coordinates(i)) for i in range(3))


def resample_grid(shape: tuple[int, ...], affine: np.ndarray, target: float = 1.0) -> ResampleGrid:
    """The 1 mm grid SynthSeg resamples onto (factors from the affine's column norms)."""
    pixdim = np.sqrt(np.sum(affine * affine, axis=0))[:-1]
    factor = pixdim / target
    start = -(factor - 1) / (2 * factor)
    step = 1.0 / factor
    stop = start + step * np.ceil(np.asarray(shape[:3]) * factor)
    return ResampleGrid(start=start, step=step, stop=stop, input_shape=tuple(int(n) for n in shape[:3]))


def linear_along_axis(data: np.ndarray, axis: int, coords: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``data`` along ``axis`` at (clipped) positions ``coords``."""
    n = data.shape[axis]
    if n == 1:
        return np.repeat(data, len(coords), axis=axis)
    i0 = np.clip(np.floor(coords).astype(np.int64), 0, n - 2)
    w = (coords - i0).astype(data.dtype)
    a = np.take(data, i0, axis=axis)
    b = np.take(data, i0 + 1, axis=axis)
    shape = [1] * data.ndim
    shape[axis] = len(coords)
    w = w.reshape(shape)
    return a * (1 - w) + b * w


def resample_linear(data: np.ndarray, grid: ResampleGrid) -> np.ndarray:
    """Trilinear interpolation of a 3D array (or 3D + channels) onto ``grid``."""
    out = data
    for axis in range(3):
        out = linear_along_axis(out, axis, grid.coordinates(axis))
    return out


def resample_to_1mm(data: np.ndarray, affine: np.ndarray, target: float = 1.0
                    ) -> tuple[np.ndarray, np.ndarray, ResampleGrid]:
    """Gaussian pre-blur (sigma 0.25/f where f <= 1), trilinear resampling, updated affine."""
    pixdim = np.sqrt(np.sum(affine * affine, axis=0))[:-1]
    factor = pixdim / target
    sigmas = 0.25 / factor
    sigmas[factor > 1] = 0
    blurred = gaussian_filter(data, sigmas)
    grid = resample_grid(data.shape, affine, target)
    out = resample_linear(blurred, grid)
    return out, resampled_affine(affine, target), grid


def resampled_affine(affine: np.ndarray, target: float = 1.0) -> np.ndarray:
    """The affine of :func:`resample_to_1mm`'s output."""
    factor = np.sqrt(np.sum(affine * affine, axis=0))[:-1] / target
    new_affine = affine.copy()
    for c in range(3):
        new_affine[:-1, c] = new_affine[:-1, c] / factor[c]
    new_affine[:-1, -1] = new_affine[:-1, -1] - new_affine[:-1, :-1] @ (0.5 * (factor - 1))
    return new_affine


@dataclass(frozen=True)
class Orientation:
    """How an array was brought to RAS: ``ras = flip(transpose(x, axes), flips)``."""

    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    def to_ras(self, x: np.ndarray) -> np.ndarray:
        """View of ``x`` (3D, optionally with trailing channels) in RAS order."""
        x = np.transpose(x, (*self.axes, *range(3, x.ndim)))
        for i, f in enumerate(self.flips):
            if f:
                x = np.flip(x, axis=i)
        return x

    def from_ras(self, x: np.ndarray) -> np.ndarray:
        """View of a RAS-ordered array in the original voxel order (inverse of to_ras)."""
        for i, f in enumerate(self.flips):
            if f:
                x = np.flip(x, axis=i)
        inverse = np.argsort(self.axes)
        return np.transpose(x, (*inverse, *range(3, x.ndim)))


def ras_axes(affine: np.ndarray) -> np.ndarray:
    """For each world axis (R, A, S), the voxel axis closest to it (SynthSeg's get_ras_axes)."""
    inv = np.linalg.inv(affine)
    axes = np.argmax(np.abs(inv[0:3, 0:3]), axis=0)
    for i in range(3):
        if i not in axes:
            unique, counts = np.unique(axes, return_counts=True)
            incorrect = unique[np.argmax(counts)]
            axes[np.where(axes == incorrect)[-1][-1]] = i
    return axes


def orientation_to_ras(affine: np.ndarray) -> Orientation:
    """The axis permutation and flips that bring an image to RAS (no interpolation)."""
    axes = ras_axes(affine)
    permuted = affine[:, axes]
    flips = tuple(bool(permuted[i, i] < 0) for i in range(3))
    return Orientation(axes=tuple(int(a) for a in axes), flips=flips)


def reorient_to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, Orientation]:
    """Reorient by axis permutation and flips; returns the RAS array, its affine and the mapping."""
    o = orientation_to_ras(affine)
    new_affine = affine.copy()
    new_affine[:, [0, 1, 2]] = affine[:, list(o.axes)]
    ras = o.to_ras(data)
    for i, f in enumerate(o.flips):
        if f:
            new_affine[:, i] = -new_affine[:, i]
            new_affine[:3, 3] = new_affine[:3, 3] - new_affine[:3, i] * (ras.shape[i] - 1)
    return np.ascontiguousarray(ras), new_affine, o


def round_up(n: int, m: int) -> int:
    """Smallest multiple of ``m`` that is >= ``n``."""
    return int(-(-n // m) * m)


def centre_crop_box(shape: tuple[int, ...], crop: list[int], multiple: int = 32) -> tuple[slice, ...]:
    """SynthSeg's ``--crop``: sizes rounded up to ``multiple``, centred, floor start."""
    box = []
    for n, c in zip(shape[:3], crop):
        c = round_up(c, multiple)
        if c >= n:
            box.append(slice(0, n))
        else:
            start = int((n - c) / 2)
            box.append(slice(start, start + c))
    return tuple(box)


def normalise(data: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Clip to the [low, high] percentiles of all voxels and rescale to [0, 1] (float64)."""
    lo, hi = np.percentile(data, [low, high])
    if lo == hi:
        return np.zeros_like(data, dtype=np.float64)
    return (np.clip(data, lo, hi) - lo) / (hi - lo)


def padding_box(shape: tuple[int, ...], min_size: list[int], multiple: int = 32
                ) -> tuple[tuple[int, int], ...]:
    """Low/high zero padding to a multiple of ``multiple`` and at least ``min_size`` per axis."""
    out = []
    for n, m in zip(shape[:3], min_size):
        target = max(round_up(n, multiple), round_up(m, multiple))
        low = (target - n) // 2
        out.append((low, target - n - low))
    return tuple(out)
