"""Reading and writing images: NIfTI, MGZ (nibabel) and NRRD (pynrrd), with input checks."""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputImageError, OutputPathError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh", ".nrrd", ".nhdr")
MIN_VOXEL_MM = 0.05
MAX_VOXEL_MM = 20.0
MAX_CHANNELS = 10  # SynthSeg reads a last dimension of at most 10 as channels


@dataclass
class Image:
    """A 3D image: voxel values (float64, scaling applied), its affine, header and zooms."""

    data: np.ndarray
    affine: np.ndarray
    header: object | None
    zooms: np.ndarray
    path: Path


def image_suffix(path: str | os.PathLike) -> str | None:
    """The image extension of ``path`` (``.nii.gz``, ``.mgz``, ...), or None."""
    name = str(path).lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), None)


def list_images(folder: Path) -> list[Path]:
    """The images of a folder, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and image_suffix(p))


def _load_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nrrd

    data, header = nrrd.read(str(path))
    dirs = header.get("space directions")
    if dirs is None:
        raise InputImageError(f"{path}: NRRD file without 'space directions'")
    dirs = np.asarray([d for d in dirs if d is not None and not np.any(np.isnan(np.asarray(d, float)))],
                      dtype=float)
    if data.ndim == 4 and dirs.shape[0] == 3:
        kinds = header.get("kinds", [])
        if kinds and kinds[0] not in ("domain", "space"):
            data = np.moveaxis(data, 0, -1)
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
    space = str(header.get("space", "left-posterior-superior")).lower()
    affine = np.eye(4)
    affine[:3, :3] = dirs.T
    affine[:3, 3] = origin
    if space in ("left-posterior-superior", "lps"):
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    elif space not in ("right-anterior-superior", "ras"):
        raise InputImageError(f"{path}: unsupported NRRD space {space!r}")
    return np.asarray(data, dtype=np.float64), affine


def load_image(path: str | os.PathLike) -> Image:
    """Load and check an image the way SynthSeg does (float64, squeezed, first of <=10 frames)."""
    path = Path(path)
    if not path.exists():
        raise InputImageError(f"{path}: file not found")
    if not path.is_file():
        raise InputImageError(f"{path}: not a file")
    suffix = image_suffix(path)
    if suffix is None:
        raise InputImageError(f"{path}: not an image (expected one of {', '.join(IMAGE_SUFFIXES)})")
    try:
        if suffix in (".nrrd", ".nhdr"):
            data, affine = _load_nrrd(path)
            header = None
            zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        else:
            img = nib.load(str(path))
            data = img.get_fdata(dtype=np.float64)
            affine = np.asarray(img.affine, dtype=np.float64)
            header = img.header
            zooms = np.asarray(header.get_zooms(), dtype=np.float32)
            if suffix in (".nii", ".nii.gz"):
                zooms = _raw_nifti_zooms(path, zooms)
    except InputImageError:
        raise
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise InputImageError(f"{path}: corrupt or truncated compressed file ({e})") from e
    except Exception as e:  # nibabel and pynrrd raise many types for unreadable files
        if suffix in (".nii.gz", ".mgz") and not _gzip_intact(path):
            raise InputImageError(f"{path}: corrupt or truncated compressed (gzip) file") from e
        raise InputImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    return check_image(Image(np.squeeze(data), affine, header, zooms, path))


def _raw_nifti_zooms(path: Path, zooms: np.ndarray) -> np.ndarray:
    """Voxel sizes as stored: nibabel silently replaces zero or negative pixdim on load."""
    with nib.openers.ImageOpener(str(path)) as f:
        raw = nib.Nifti1Header.from_fileobj(f, check=False)
    stored = np.asarray(raw["pixdim"][1:1 + len(zooms)], dtype=np.float32)
    return stored if np.any(stored[:3] <= 0) else zooms


def _gzip_intact(path: Path) -> bool:
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 24):
                pass
        return True
    except (OSError, EOFError, zlib.error):
        return False


def check_image(image: Image) -> Image:
    """Reject what cannot be segmented, with a message that says why."""
    data, path = image.data, image.path
    if data.ndim == 4:
        if data.shape[-1] > MAX_CHANNELS:
            raise InputImageError(f"{path}: 4D image with {data.shape[-1]} volumes; give a single 3D volume")
        raise InputImageError(f"{path}: image has {data.shape[-1]} channels; SynthSeg segments a "
                              "single-channel 3D volume (extract one channel first)")
    if data.ndim < 3:
        raise InputImageError(f"{path}: {data.ndim}D image of shape {data.shape}; a 3D volume is required")
    if data.ndim > 4:
        raise InputImageError(f"{path}: {data.ndim}D image; a 3D volume is required")
    if not np.all(np.isfinite(data)):
        raise InputImageError(f"{path}: image contains NaN or infinite values")
    if data.max() == data.min():
        what = "all zero" if data.max() == 0 else "constant"
        raise InputImageError(f"{path}: image is {what}; nothing to segment")
    zooms = np.asarray(image.zooms[:3], dtype=float)
    norms = np.sqrt((image.affine[:3, :3] ** 2).sum(axis=0))
    for label, sizes in (("header voxel size", zooms), ("affine voxel size", norms)):
        if np.any(~np.isfinite(sizes)) or np.any(sizes <= 0):
            raise InputImageError(f"{path}: invalid {label} {tuple(np.round(sizes, 4))} mm (zero or negative)")
        if np.any(sizes < MIN_VOXEL_MM) or np.any(sizes > MAX_VOXEL_MM):
            raise InputImageError(f"{path}: implausible {label} {tuple(np.round(sizes, 4))} mm "
                                  f"(expected between {MIN_VOXEL_MM} and {MAX_VOXEL_MM} mm)")
    if abs(np.linalg.det(image.affine[:3, :3])) < 1e-12:
        raise InputImageError(f"{path}: singular affine (axes are not independent)")
    return image


def _nifti_like(data: np.ndarray, affine: np.ndarray, header, dtype: str | None):
    """The image object SynthSeg's ``save_volume`` builds: a Nifti1Image with the input header."""
    if dtype is not None:
        if "int" in dtype:
            data = np.round(data)
        data = data.astype(dtype, copy=False)  # views stay views: nibabel writes them slice by slice
    img = nib.Nifti1Image(data, affine, header if isinstance(header, nib.Nifti1Header) or header is None
                          else _header_for_nifti(header))
    if dtype is not None:
        img.set_data_dtype(dtype)
    return img


def _header_for_nifti(header):
    try:
        return nib.Nifti1Header.from_header(header)
    except Exception:
        return None


def save_image(data: np.ndarray, affine: np.ndarray, header, path: str | os.PathLike,
               dtype: str | None = None) -> Path:
    """Save like SynthSeg's ``save_volume``: a Nifti1Image with the input header, converted
    by nibabel for ``.mgz``; NRRD in LPS space. Use an :class:`OutputTransaction` path for
    atomic writes."""
    path = Path(path)
    suffix = image_suffix(path)
    if suffix is None:
        raise OutputPathError(f"{path}: output name needs an image extension ({', '.join(IMAGE_SUFFIXES)})")
    try:
        if suffix in (".nrrd", ".nhdr"):
            _save_nrrd(data, affine, path, dtype)
        else:
            nib.save(_nifti_like(data, affine, header, dtype), str(path))
    except OSError as e:
        raise OutputPathError(f"cannot write {path}: {e.strerror or e}") from e
    return path


def _save_nrrd(data: np.ndarray, affine: np.ndarray, path: Path, dtype: str | None) -> None:
    import nrrd

    if dtype is not None:
        data = (np.round(data) if "int" in dtype else data).astype(dtype)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    header = {"space": "left-posterior-superior",
              "space directions": [list(c) for c in lps[:3, :3].T] + ([[np.nan] * 3] if data.ndim == 4 else []),
              "space origin": list(lps[:3, 3]),
              "kinds": ["domain"] * 3 + (["vector"] if data.ndim == 4 else []),
              "encoding": "gzip"}
    nrrd.write(str(path), data, header, index_order="F")
