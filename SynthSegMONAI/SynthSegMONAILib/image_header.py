"""What an image file declares (shape, voxel type, affine, voxel sizes), read without its voxels
and checked before anything is allocated: a file may declare sizes its bytes do not hold, or
a geometry that would mislead the pipeline."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputImageError
from .nrrd_reader import NrrdHeader, read_nrrd_header


@dataclass(frozen=True)
class ImageHeader:
    """An image's declared layout; ``stored_shape`` has the three spatial axes first."""

    path: Path
    suffix: str
    stored_shape: tuple[int, ...]
    dtype: np.dtype
    affine: np.ndarray
    zooms: np.ndarray
    nrrd: NrrdHeader | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape the pipeline sees: spatial axes, then the other axes longer than one."""
        return squeezed_shape(self.stored_shape)

    @property
    def stored_values(self) -> int:
        return math.prod(self.stored_shape)


def squeezed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` without the single-element axes after the three spatial ones."""
    return tuple(shape[:3]) + tuple(n for n in shape[3:] if n != 1)


def squeeze_extra_axes(data: np.ndarray) -> np.ndarray:
    """Drop single-element axes beyond the third; spatial axes are kept even of size one (a
    plain ``np.squeeze`` would move a (1, X, Y, Z) series' axes into the spatial ones)."""
    return data.reshape(squeezed_shape(data.shape)) if data.ndim > 3 else data


def read_image_header(path: str | os.PathLike) -> ImageHeader:
    """Read and check an image's header; no voxel is read (except a NRRD's data file sizes)."""
    from .volume_io import _raw_nifti_zooms, image_file_suffix, image_read_errors

    path = Path(path)
    suffix = image_file_suffix(path)
    with image_read_errors(path, suffix):
        if suffix in (".nrrd", ".nhdr"):
            nrrd = read_nrrd_header(path)
            affine = nrrd.affine
            header = ImageHeader(path, suffix, nrrd.shape, nrrd.dtype, affine,
                                 np.sqrt((affine[:3, :3] ** 2).sum(axis=0)), nrrd)
        else:
            img = nib.load(str(path))
            zooms = np.asarray(img.header.get_zooms(), dtype=np.float32)
            if suffix in (".nii", ".nii.gz"):
                zooms = _raw_nifti_zooms(path, zooms)
            header = ImageHeader(path, suffix, tuple(int(n) for n in img.shape),
                                 np.dtype(img.get_data_dtype()), np.asarray(img.affine, dtype=np.float64), zooms)
    return check_header(header)


def check_header(header: ImageHeader) -> ImageHeader:
    """Refuse a shape, voxel type or geometry that cannot be segmented, before reading voxels."""
    from .volume_io import MAX_CHANNELS, check_geometry

    path, stored = header.path, header.stored_shape
    if any(n <= 0 for n in stored):
        raise InputImageError(f"{path}: image has a zero-size dimension (shape {stored}); nothing to segment")
    if len(stored) < 3:
        raise InputImageError(f"{path}: {len(stored)}D image of shape {stored}; a 3D volume is required")
    spatial = [n for n in stored[:3] if n > 1]
    extra = header.shape[3:]
    if len(spatial) < 3:
        if extra:
            raise InputImageError(
                f"{path}: image of shape {stored} has a single voxel along a spatial axis and {extra[0]} "
                "volumes along the fourth: not a 3D volume (squeezing it would swap its axes); save the "
                "scan as a 3D image")
        raise InputImageError(f"{path}: {len(spatial)}D image of shape {stored} (a single voxel along a "
                              "spatial axis); a 3D volume is required")
    if len(extra) > 1:
        raise InputImageError(f"{path}: {len(header.shape)}D image of shape {stored}; a 3D volume is "
                              "required")
    if extra and extra[0] > MAX_CHANNELS:
        raise InputImageError(f"{path}: 4D image with {extra[0]} volumes; give a single 3D volume")
    kind = header.dtype.kind
    if kind == "c":
        raise InputImageError(f"{path}: complex-valued image ({header.dtype}): its imaginary part would be "
                              "lost; give a magnitude (real-valued) image")
    if kind not in "biuf" or header.dtype.fields is not None:
        raise InputImageError(f"{path}: voxel type {header.dtype} is not a number (RGB or structured data); "
                              "give a single-channel intensity image")
    check_geometry(path, header.zooms, header.affine)
    return header
