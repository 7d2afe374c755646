"""Soft volumes and SynthSeg's ``--vol`` CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .errors import OutputPathError
from .half_float import as_float32
from .labels import csv_names
from .output_files import atomic_output


def add_running_sums(posteriors: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """``acc`` plus the sums of channels 1.. of (..., C) posteriors, added voxel by voxel in C
    order, in ``acc``'s dtype: blocks summed one after the other give the same digits as one
    whole-array pass (:func:`soft_volumes`). The posteriors are left as they are."""
    # a copy (never the input itself, which ``rows[0] += acc`` would change)
    if posteriors.dtype == np.float16 and acc.dtype == np.float32:
        rows = as_float32(posteriors)
    else:
        rows = np.array(posteriors, dtype=acc.dtype, order="C")
    rows = rows.reshape(-1, posteriors.shape[-1])[:, 1:]
    if not len(rows):
        return acc
    rows[0] += acc  # acc + r0 == r0 + acc: the running sum continues, in order
    return np.add.reduce(rows, axis=0)  # a reduction over the outer axis adds row after row


def soft_volumes(posteriors_xyzc: np.ndarray, dtype=np.float32, chunk: int = 8) -> np.ndarray:
    """Per-channel sums over voxels of channels 1.., accumulated voxel by voxel in C order.

    ``posteriors_xyzc`` is the (X, Y, Z, C) array, or any view of it, in the INPUT's voxel
    order: SynthSeg sums that array sequentially, so the same order gives the same digits.
    """
    acc = np.zeros(posteriors_xyzc.shape[-1] - 1, dtype=dtype)
    for a in range(0, posteriors_xyzc.shape[0], chunk):
        acc = add_running_sums(posteriors_xyzc[a:a + chunk], acc)
    return acc


def volume_row(sums: np.ndarray, voxel_volume, with_total: bool) -> list:
    """Volumes as SynthSeg prints them: optional total first, times voxel volume, 3 decimals.

    The dtype of ``sums`` decides the printing (float32 without ``--crop``, float64 with).
    """
    values = sums
    if with_total:
        values = np.concatenate([np.array([np.sum(sums)], dtype=sums.dtype), sums])
    values = np.around(values * values.dtype.type(voxel_volume), 3)
    return [str(v) for v in values]


def has_total(labels: list[int]) -> bool:
    """Whether volumes of ``labels`` come with a total intracranial volume (the model segments CSF, 24)."""
    return 24 in labels


def csv_header(labels: list[int]) -> list[str]:
    """``subject``, ``total intracranial`` (when CSF is segmented), the structure names."""
    names = csv_names(labels[1:])
    return ["subject", *(["total intracranial"] if has_total(labels) else []), *names]


def subject_name(path: Path) -> str:
    """SynthSeg's row name: the base name with only ``.nii.gz`` removed."""
    return path.name.replace(".nii.gz", "")


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[str]]) -> Path:
    """Write a CSV in SynthSeg's layout (CRLF line ends, as Python's csv writer) atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    try:
        with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
            f.write(buf.getvalue())
    except OSError as e:
        raise OutputPathError(f"cannot write {path}: {e.strerror or e}") from e
    return path


def write_volumes_csv(path: Path, labels: list[int], rows: Iterable[list[str]]) -> Path:
    """Write the volumes CSV of ``labels`` atomically."""
    return write_csv(path, csv_header(labels), rows)


def row_volumes(labels: list[int], row: list[str]) -> tuple[list[float], float | None]:
    """The numbers of a CSV row (``subject``, optional total, one volume per structure of ``labels``
    but the background): the structure volumes in mm^3, and the total intracranial volume or None."""
    values = [float(v) for v in row[1:]]
    if has_total(labels):
        return values[1:], values[0]
    return values, None
