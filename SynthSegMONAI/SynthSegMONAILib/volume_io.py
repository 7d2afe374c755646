"""Reading and writing images: NIfTI, MGZ (nibabel) and NRRD (pynrrd), with input checks."""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
    notes: list[str] = field(default_factory=list)  #: warnings for the user (e.g. a channel was picked)


def image_suffix(path: str | os.PathLike) -> str | None:
    """The image extension of ``path`` (``.nii.gz``, ``.mgz``, ...), or None."""
    name = str(path).lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), None)


def list_images(folder: Path) -> list[Path]:
    """The images of a folder, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and image_suffix(p))


def _load_nrrd(path: Path, header=None) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (float64, spatial axes first) and RAS affine of a NRRD file (see :mod:`.nrrd_reader`)."""
    from .nrrd_reader import read_nrrd_data, read_nrrd_header

    header = header or read_nrrd_header(path)
    return np.asarray(read_nrrd_data(header), dtype=np.float64), header.affine


@contextmanager
def image_read_errors(path: Path, suffix: str) -> Iterator[None]:
    """Turn what nibabel, pynrrd and gzip raise for an unreadable file into one clear error."""
    try:
        yield
    except InputImageError:
        raise
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise InputImageError(f"{path}: corrupt or truncated compressed file ({e})") from e
    except Exception as e:  # nibabel and pynrrd raise many types for unreadable files
        if suffix in (".nii.gz", ".mgz") and not _gzip_intact(path):
            raise InputImageError(f"{path}: corrupt or truncated compressed (gzip) file") from e
        raise InputImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def image_file_suffix(path: Path) -> str:
    """The image extension of an existing file; a clear error for a missing file or another kind."""
    if not path.exists():
        raise InputImageError(f"{path}: file not found")
    if not path.is_file():
        raise InputImageError(f"{path}: not a file")
    suffix = image_suffix(path)
    if suffix is None:
        raise InputImageError(f"{path}: not an image (expected one of {', '.join(IMAGE_SUFFIXES)})")
    return suffix


def load_image(path: str | os.PathLike, channel: int | None = None, declared=None) -> Image:
    """Load and check an image the way SynthSeg does (float64, squeezed, first of <=10 channels).

    ``channel`` picks another channel of a multi-channel image (0-based). ``declared`` is the
    file's :class:`~.image_header.ImageHeader` when already read (it is read and checked
    first otherwise, so that nothing is allocated for a header that declares nonsense).
    """
    from .image_header import read_image_header, squeeze_extra_axes

    path = Path(path)
    declared = declared if declared is not None else read_image_header(path)
    suffix, affine, zooms = declared.suffix, declared.affine, declared.zooms
    with image_read_errors(path, suffix):
        if suffix in (".nrrd", ".nhdr"):
            data, _ = _load_nrrd(path, declared.nrrd)
            header = None
        else:
            img = nib.load(str(path))
            data = img.get_fdata(dtype=np.float64)
            header = img.header
    return check_image(pick_channel(Image(squeeze_extra_axes(data), affine, header, zooms, path), channel))


def pick_channel(image: Image, channel: int | None = None) -> Image:
    """SynthSeg's rule: a last dimension of at most 10 holds channels; keep the first (or ``channel``)."""
    data = image.data
    if data.ndim == 4 and data.shape[-1] <= MAX_CHANNELS:
        n = data.shape[-1]
        index = 0 if channel is None else channel
        if not 0 <= index < n:
            raise InputImageError(f"{image.path}: --channel {index} does not exist (the image has {n} channels, "
                                  f"0 to {n - 1})")
        image.data = np.ascontiguousarray(data[..., index])
        if channel is None:
            image.notes.append(f"{image.path.name} has {n} channels: segmenting the first (as SynthSeg); "
                               "--channel N picks another")
    elif channel:
        raise InputImageError(f"{image.path}: --channel {channel} given, but the image has a single channel")
    return image


def _raw_nifti_zooms(path: Path, zooms: np.ndarray) -> np.ndarray:
    """Voxel sizes as stored: nibabel silently replaces zero or negative pixdim on load."""
    with nib.openers.ImageOpener(str(path)) as f:
        raw = nib.Nifti1Header.from_fileobj(f, check=False)
    stored = np.asarray(raw["pixdim"][1:1 + len(zooms)], dtype=np.float32)
    return stored if np.any(stored[:3] <= 0) else zooms


def _gzip_intact(path: Path, limit: int = 2**32) -> bool:
    """Whether the gzip stream decompresses without error (as far as ``limit`` bytes)."""
    try:
        with gzip.open(path, "rb") as f:
            while limit > 0:
                chunk = len(f.read(1 << 24))
                if not chunk:
                    break
                limit -= chunk
        return True
    except (OSError, EOFError, zlib.error):
        return False


def check_image(image: Image) -> Image:
    """Reject what cannot be segmented, with a message that says why."""
    data, path = image.data, image.path
    if data.ndim == 4:  # more than MAX_CHANNELS: a series of volumes, not channels
        raise InputImageError(f"{path}: 4D image with {data.shape[-1]} volumes; give a single 3D volume")
    if data.ndim < 3:
        raise InputImageError(f"{path}: {data.ndim}D image of shape {data.shape}; a 3D volume is required")
    if data.ndim > 4:
        raise InputImageError(f"{path}: {data.ndim}D image; a 3D volume is required")
    if not np.all(np.isfinite(data)):
        raise InputImageError(f"{path}: image contains NaN or infinite values")
    if data.max() == data.min():
        what = "all zero" if data.max() == 0 else "constant"
        raise InputImageError(f"{path}: image is {what}; nothing to segment")
    check_geometry(path, image.zooms, image.affine)
    return image


def check_geometry(path: Path, zooms: np.ndarray, affine: np.ndarray) -> None:
    """Refuse a position that is not finite, implausible voxel sizes and a singular affine."""
    if not np.all(np.isfinite(affine)):
        raise InputImageError(f"{path}: the image's position (affine: sform, qform, MGZ centre or NRRD "
                              "origin and directions) holds NaN or infinite values; fix the header")
    zooms = np.asarray(zooms[:3], dtype=float)
    norms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    for label, sizes in (("header voxel size", zooms), ("affine voxel size", norms)):
        if np.any(~np.isfinite(sizes)) or np.any(sizes <= 0):
            raise InputImageError(f"{path}: invalid {label} {tuple(np.round(sizes, 4))} mm (zero or negative)")
        if np.any(sizes < MIN_VOXEL_MM) or np.any(sizes > MAX_VOXEL_MM):
            raise InputImageError(f"{path}: implausible {label} {tuple(np.round(sizes, 4))} mm "
                                  f"(expected between {MIN_VOXEL_MM} and {MAX_VOXEL_MM} mm)")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputImageError(f"{path}: singular affine (axes are not independent)")


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
