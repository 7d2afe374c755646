"""Dice and volume agreement between segmentations and reference label volumes.

Conventions:

* The reference is resampled onto the SEGMENTATION's voxel grid by nearest neighbour, using
  both images' affines (each segmentation voxel centre takes the reference voxel whose centre
  is nearest in physical space). Segmentation voxels whose centre falls outside the reference
  are IGNORED (not scored): the reference says nothing about them.
* ``ref_format="aseg"`` (a FreeSurfer aseg) scores as SynthSeg does: 77 (WM hypointensities)
  and 251-255 (corpus callosum) become the cerebral white matter (2 or 41) of the nearer
  hemisphere (nearest WM voxel), and reference labels outside the model's label list are
  ignored (for SynthSeg 2.0: 30, 31, 62, 63, 72, 80, 85, ...; 24 too for 1.0). The mapping is
  done on the reference's own grid, before resampling.
* ``ref_format="labels"``: reference values are used as they are; every voxel is scored.
* Dice per structure is ``2|S ∩ R| / (|S| + |R|)`` over the scored voxels; structures absent
  from both are left out. Means are over foreground structures (label 0 excluded). The
  "hemispheres merged" variant pools each left/right pair (label table ``lr_pair``) into one
  structure (Dice of the union masks) before averaging.
* Volumes (mm^3) are counted over the scored voxels of the segmentation's grid, for the
  segmentation and for the resampled reference alike.

Folder mode pairs files by subject name: a segmentation ``<name>_synthseg<ext>`` or
``<name><ext>`` matches a reference ``<name><ext>`` or a subject folder ``<name>/`` holding
``aseg.mgz`` (or ``aseg.nii.gz``/``aseg.nii``). SynthSeg's other outputs
(``*_posteriors``, ``*_resampled``) in the segmentation folder are skipped.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .errors import InputImageError, OutputPathError
from .labels import all_structures, synthseg_labels
from .output_files import atomic_output
from .volume_io import _load_nrrd, image_file_suffix, image_read_errors, image_suffix, list_images

IGNORE = -1  #: value of voxels that are not scored
ASEG_WM_MERGED = (77, 251, 252, 253, 254, 255)  #: aseg labels scored as the nearer cerebral WM
CEREBRAL_WM = (2, 41)
REF_FORMATS = ("aseg", "labels")
ASEG_NAMES = ("aseg.mgz", "aseg.nii.gz", "aseg.nii")
SEG_TAG = "_synthseg"
SKIPPED_TAGS = ("_posteriors", "_resampled")


# ---------------------------------------------------------------------------- aseg mapping

def aseg_to_labels(aseg: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """FreeSurfer aseg values -> the model's label values, ``IGNORE`` where SynthSeg's scoring
    ignores them (77 and 251-255 become the white matter, 2 or 41, of the nearest WM voxel)."""
    aseg = np.asarray(aseg).astype(np.int64)  # a copy: filled below
    merge = np.isin(aseg, ASEG_WM_MERGED)
    if merge.any():
        wm = np.isin(aseg, CEREBRAL_WM)
        if wm.any():
            _, nearest = ndimage.distance_transform_edt(~wm, return_indices=True)
            aseg[merge] = aseg[tuple(n[merge] for n in nearest)]
        else:
            aseg[merge] = CEREBRAL_WM[0]
    aseg[~np.isin(aseg, np.asarray(labels, dtype=np.int64))] = IGNORE
    return aseg


def map_aseg(aseg: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """FreeSurfer aseg values -> output channel indices (position in ``labels``), ``IGNORE``
    where SynthSeg's scoring ignores them. Used by training validation."""
    values = aseg_to_labels(aseg, labels)
    out = np.full(values.shape, IGNORE, dtype=np.int64)
    for channel, lab in enumerate(labels):
        out[values == lab] = channel
    return out


# ---------------------------------------------------------------------------- resampling

def resample_nearest(data: np.ndarray, affine: np.ndarray, shape: Sequence[int], target_affine: np.ndarray,
                     fill: int = IGNORE, chunk: int = 16) -> np.ndarray:
    """``data`` (voxel-to-world ``affine``) sampled by nearest neighbour at the voxel centres of
    the grid (``shape``, ``target_affine``); centres outside ``data`` get ``fill``."""
    shape = tuple(int(s) for s in shape[:3])
    if data.shape == shape and np.allclose(affine, target_affine, atol=1e-5):
        return data.copy()
    m = np.linalg.solve(np.asarray(affine, dtype=np.float64), np.asarray(target_affine, dtype=np.float64))
    out = np.full(shape, fill, dtype=data.dtype)
    j = np.arange(shape[1], dtype=np.float64)[None, :, None]
    k = np.arange(shape[2], dtype=np.float64)[None, None, :]
    for i0 in range(0, shape[0], chunk):
        i = np.arange(i0, min(i0 + chunk, shape[0]), dtype=np.float64)[:, None, None]
        idx, valid = [], np.ones((len(i), shape[1], shape[2]), dtype=bool)
        for a in range(3):
            src = np.floor(m[a, 0] * i + m[a, 1] * j + m[a, 2] * k + m[a, 3] + 0.5).astype(np.int64)
            valid &= (src >= 0) & (src < data.shape[a])
            idx.append(src)
        out[i0:i0 + len(i)][valid] = data[idx[0][valid], idx[1][valid], idx[2][valid]]
    return out


# ---------------------------------------------------------------------------- scoring

@dataclass(frozen=True)
class Evaluation:
    """Agreement of one segmentation with its reference (label value -> number)."""

    dice: dict[int, float]  #: per structure present in either (background included)
    mean_dice: float  #: mean over foreground structures (NaN if none)
    merged_dice: dict[str, float]  #: per structure with left/right pooled, by merged name
    mean_merged_dice: float
    seg_volume: dict[int, float]  #: mm^3 over the scored voxels
    ref_volume: dict[int, float]
    volume_difference: dict[int, float]  #: (seg - ref) / ref, where the reference has the structure
    scored_voxels: int

    def to_dict(self) -> dict:
        """JSON-friendly form (string keys, NaN as None)."""
        def clean(v: float) -> float | None:
            return None if isinstance(v, float) and math.isnan(v) else v

        return {"dice": {str(k): v for k, v in self.dice.items()},
                "mean_dice": clean(self.mean_dice),
                "merged_dice": dict(self.merged_dice),
                "mean_merged_dice": clean(self.mean_merged_dice),
                "seg_volume_mm3": {str(k): v for k, v in self.seg_volume.items()},
                "ref_volume_mm3": {str(k): v for k, v in self.ref_volume.items()},
                "volume_difference": {str(k): v for k, v in self.volume_difference.items()},
                "scored_voxels": self.scored_voxels}


def structure_name(label: int) -> str:
    """FreeSurfer name of a label value (``label N`` outside the SynthSeg table)."""
    names = {s.label: s.freesurfer_name for s in all_structures()}
    return names.get(int(label), f"label {int(label)}")


def merged_name(label: int) -> str:
    """Name of a structure with both hemispheres pooled (``Left-``/``Right-`` dropped)."""
    name = structure_name(label)
    for prefix in ("Left-", "Right-"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _hemisphere_groups(structures: Sequence[int]) -> dict[str, list[int]]:
    """Structures grouped by merged name: a left/right pair, or a structure alone."""
    pairs = {s.label: s.lr_pair for s in all_structures()}
    groups: dict[str, list[int]] = {}
    for lab in structures:
        pair = pairs.get(lab)
        key = merged_name(lab) if pair is not None and pair in structures else structure_name(lab)
        groups.setdefault(key, []).append(lab)
    return groups


def _nanmean(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def score(seg: np.ndarray, ref: np.ndarray, structures: Sequence[int] | None = None,
          voxel_volume: float = 1.0) -> Evaluation:
    """Dice and volumes of ``seg`` against ``ref`` (same grid; ``ref == IGNORE`` is not scored).

    ``structures``: the label values to score (default: every value found in either); values
    outside it are neither structure nor background.
    """
    if seg.shape != ref.shape:
        raise InputImageError(f"segmentation {seg.shape} and reference {ref.shape} differ in shape")
    keep = ref != IGNORE
    s, r = np.asarray(seg)[keep].astype(np.int64), np.asarray(ref)[keep].astype(np.int64)
    if structures is None:
        structures = np.union1d(np.unique(s), np.unique(r)).tolist()
    labs = np.asarray(sorted(int(x) for x in structures), dtype=np.int64)
    n = len(labs)

    def index(a: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(labs, a), 0, n - 1)
        return np.where(labs[pos] == a, pos, n)  # n: not a scored structure

    conf = np.bincount(index(s) * (n + 1) + index(r), minlength=(n + 1) ** 2).reshape(n + 1, n + 1)
    seg_count, ref_count, inter = conf.sum(1)[:n], conf.sum(0)[:n], np.diag(conf)[:n]
    dice, seg_vol, ref_vol, diff = {}, {}, {}, {}
    for c, lab in enumerate(labs.tolist()):
        total = seg_count[c] + ref_count[c]
        if total == 0:
            continue
        dice[lab] = float(2 * inter[c] / total)
        seg_vol[lab] = float(seg_count[c] * voxel_volume)
        ref_vol[lab] = float(ref_count[c] * voxel_volume)
        if ref_count[c]:
            diff[lab] = float((seg_count[c] - ref_count[c]) / ref_count[c])
    merged = {}
    position = {lab: c for c, lab in enumerate(labs.tolist())}
    for name, group in _hemisphere_groups([lab for lab in labs.tolist() if lab != 0]).items():
        g = [position[lab] for lab in group]
        total = seg_count[g].sum() + ref_count[g].sum()
        if total:
            merged[name] = float(2 * conf[np.ix_(g, g)].sum() / total)
    return Evaluation(dice=dice, mean_dice=_nanmean(v for k, v in dice.items() if k != 0),
                      merged_dice=merged, mean_merged_dice=_nanmean(merged.values()),
                      seg_volume=seg_vol, ref_volume=ref_vol, volume_difference=diff,
                      scored_voxels=int(keep.sum()))


def label_data(img: nib.spatialimages.SpatialImage, what: str = "label volume") -> np.ndarray:
    """The integer label array of a 3D image; raises :class:`InputImageError` if it is not one."""
    name = getattr(img, "get_filename", lambda: None)() or what
    try:
        data = np.squeeze(np.asanyarray(img.dataobj))
    except Exception as e:  # corrupt or truncated files fail only when the data is read
        raise InputImageError(f"{name}: cannot read the {what} ({type(e).__name__}: {e})") from e
    if data.ndim != 3:
        raise InputImageError(f"{name}: {data.ndim}D {what} of shape {data.shape}; a 3D label volume is needed")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)):
            raise InputImageError(f"{name}: {what} contains NaN or infinite values")
        rounded = np.rint(data)
        if np.any(np.abs(data - rounded) > 1e-3):
            raise InputImageError(f"{name}: {what} holds non-integer values (an image, not labels?)")
        data = rounded
    data = data.astype(np.int64)
    if data.size and data.min() < 0:
        raise InputImageError(f"{name}: {what} holds negative label values")
    return data


def _affine(img: nib.spatialimages.SpatialImage, what: str) -> np.ndarray:
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputImageError(f"{img.get_filename() or what}: invalid (singular) affine")
    return affine


def evaluate(seg_img: nib.spatialimages.SpatialImage, ref_img: nib.spatialimages.SpatialImage,
             ref_format: str = "aseg", labels: Sequence[int] | None = None) -> Evaluation:
    """Score a segmentation image against a reference image (any grids; see the module notes).

    ``labels``: the model's output labels (default SynthSeg 2.0's 33); with ``ref_format="aseg"``
    they are the structures scored. With ``"labels"`` and no ``labels``, every value found is scored.
    """
    if ref_format not in REF_FORMATS:
        raise ValueError(f"ref_format must be one of {REF_FORMATS}, not {ref_format!r}")
    seg = label_data(seg_img, "segmentation")
    ref = label_data(ref_img, "reference")
    seg_affine, ref_affine = _affine(seg_img, "segmentation"), _affine(ref_img, "reference")
    if ref_format == "aseg":
        labels = list(labels) if labels is not None else synthseg_labels("2.0")
        ref = aseg_to_labels(ref, labels)
    on_grid = resample_nearest(ref, ref_affine, seg.shape, seg_affine)
    if not np.any(on_grid != IGNORE):
        raise InputImageError("segmentation and reference do not overlap in physical space "
                              "(or every reference voxel is ignored); check the affines")
    return score(seg, on_grid, labels, voxel_volume=float(abs(np.linalg.det(seg_affine[:3, :3]))))


def load_label_image(path: str | os.PathLike) -> nib.spatialimages.SpatialImage:
    """A label volume as a nibabel image (NIfTI, MGZ; NRRD converted to RAS)."""
    path = Path(path)
    suffix = image_file_suffix(path)
    with image_read_errors(path, suffix):
        if suffix in (".nrrd", ".nhdr"):
            data, affine = _load_nrrd(path)
            return nib.Nifti1Image(np.asarray(data), affine)
        return nib.load(str(path))


def evaluate_files(seg_path: str | os.PathLike, ref_path: str | os.PathLike, ref_format: str = "aseg",
                   labels: Sequence[int] | None = None) -> Evaluation:
    """:func:`evaluate` on two files."""
    try:
        return evaluate(load_label_image(seg_path), load_label_image(ref_path), ref_format, labels)
    except InputImageError as e:
        if str(seg_path) in str(e) or str(ref_path) in str(e):
            raise
        raise InputImageError(f"{seg_path} vs {ref_path}: {e}") from e


# ---------------------------------------------------------------------------- folders

def _strip_suffix(path: Path) -> str:
    suffix = image_suffix(path) or ""
    return path.name[: len(path.name) - len(suffix)]


def segmentation_subject(path: Path) -> str | None:
    """Subject name of a segmentation file (``None`` for SynthSeg's non-segmentation outputs)."""
    stem = _strip_suffix(path)
    if stem.endswith(SKIPPED_TAGS):
        return None
    return stem[: -len(SEG_TAG)] if stem.endswith(SEG_TAG) else stem


def reference_files(folder: Path) -> dict[str, Path]:
    """Subject name -> reference: ``<name><ext>`` files and ``<name>/aseg.mgz`` folders."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_dir():
            ref = next((p / n for n in ASEG_NAMES if (p / n).is_file()), None)
            name = p.name
        elif image_suffix(p):
            ref, name = p, _strip_suffix(p)
        else:
            continue
        if ref is None:
            continue
        if name in found:
            raise InputImageError(f"{folder}: two references for subject {name!r}: {found[name]} and {ref}")
        found[name] = ref
    return found


def pair_subjects(seg_dir: str | os.PathLike, ref_dir: str | os.PathLike
                  ) -> tuple[list[tuple[str, Path, Path]], list[Path]]:
    """(subject, segmentation, reference) for each matched subject, sorted by name, and the
    segmentations without a reference. Raises if nothing matches."""
    seg_dir, ref_dir = Path(seg_dir), Path(ref_dir)
    for d in (seg_dir, ref_dir):
        if not d.is_dir():
            raise InputImageError(f"{d}: folder not found")
    segs: dict[str, Path] = {}
    for p in list_images(seg_dir):
        name = segmentation_subject(p)
        if name is None:
            continue
        if name in segs:
            raise InputImageError(f"{seg_dir}: two segmentations for subject {name!r}: {segs[name].name} "
                                  f"and {p.name}")
        segs[name] = p
    refs = reference_files(ref_dir)
    pairs = [(name, segs[name], refs[name]) for name in sorted(segs) if name in refs]
    if not pairs:
        raise InputImageError(f"no segmentation in {seg_dir} matches a reference in {ref_dir} "
                              f"(<name>_synthseg.nii.gz or <name>.nii.gz vs <name>.nii.gz/.mgz or <name>/aseg.mgz)")
    unmatched = [segs[name] for name in sorted(segs) if name not in refs]
    return pairs, unmatched


def evaluate_folders(seg_dir: str | os.PathLike, ref_dir: str | os.PathLike, ref_format: str = "aseg",
                     labels: Sequence[int] | None = None) -> tuple[dict[str, Evaluation], list[Path]]:
    """Evaluations by subject name (see :func:`pair_subjects`), and the unmatched segmentations."""
    pairs, unmatched = pair_subjects(seg_dir, ref_dir)
    return {name: evaluate_files(s, r, ref_format, labels) for name, s, r in pairs}, unmatched


def foreground_structures(results: Iterable[Evaluation]) -> list[int]:
    """Every foreground label scored in any of ``results``, ascending."""
    return sorted({lab for ev in results for lab in ev.dice if lab != 0})


def mean_over_subjects(results: dict[str, Evaluation]) -> dict:
    """Means over subjects: per structure (subjects where it was scored), of the subject means."""
    evs = list(results.values())
    per = {lab: _nanmean(ev.dice[lab] for ev in evs if lab in ev.dice) for lab in foreground_structures(evs)}
    names = sorted({n for ev in evs for n in ev.merged_dice})
    merged = {n: _nanmean(ev.merged_dice[n] for ev in evs if n in ev.merged_dice) for n in names}
    return {"dice": per, "merged_dice": merged,
            "mean_dice": _nanmean(ev.mean_dice for ev in evs if not math.isnan(ev.mean_dice)),
            "mean_merged_dice": _nanmean(ev.mean_merged_dice for ev in evs if not math.isnan(ev.mean_merged_dice))}


def dice_csv_text(results: dict[str, Evaluation]) -> str:
    """CSV: one row per subject; ``subject``, the two means, then Dice per structure (FreeSurfer
    names, ascending label); empty cells for structures absent from both images."""
    structures = foreground_structures(results.values())
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["subject", "mean", "mean (hemispheres merged)", *(structure_name(s) for s in structures)])

    def cell(v: float | None) -> str:
        return "" if v is None or math.isnan(v) else f"{v:.6f}"

    for name, ev in results.items():
        writer.writerow([name, cell(ev.mean_dice), cell(ev.mean_merged_dice),
                         *(cell(ev.dice.get(s)) for s in structures)])
    return buf.getvalue()


def write_dice_csv(path: str | os.PathLike, results: dict[str, Evaluation]) -> Path:
    """Write :func:`dice_csv_text` atomically (temporary name in the same folder, then rename)."""
    path = Path(path)
    try:
        with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
            f.write(dice_csv_text(results))
    except OSError as e:
        raise OutputPathError(f"cannot write {path}: {e.strerror or e}") from e
    return path


# ---------------------------------------------------------------------------- printing

def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_evaluation(ev: Evaluation) -> str:
    """Per-structure table (Dice, volumes, relative volume difference) and the means."""
    lines = [f"{'label':>5}  {'structure':<30} {'Dice':>7} {'seg mm3':>11} {'ref mm3':>11} {'vol diff':>9}"]
    for lab in sorted(k for k in ev.dice if k != 0):
        diff = ev.volume_difference.get(lab)
        lines.append(f"{lab:>5}  {structure_name(lab):<30} {ev.dice[lab]:>7.4f} {ev.seg_volume[lab]:>11.0f} "
                     f"{ev.ref_volume[lab]:>11.0f} {_fmt(None if diff is None else 100 * diff, '+.1f'):>8}%")
    lines.append(f"mean Dice: {_fmt(ev.mean_dice)} ({sum(1 for k in ev.dice if k != 0)} structures)")
    lines.append(f"mean Dice, hemispheres merged: {_fmt(ev.mean_merged_dice)} ({len(ev.merged_dice)} structures)")
    return "\n".join(lines)


def format_summary(results: dict[str, Evaluation]) -> str:
    """Per-subject means, per-structure means over subjects, and the overall means."""
    means = mean_over_subjects(results)
    lines = [f"{'subject':<30} {'mean Dice':>9} {'merged':>7}"]
    lines += [f"{name:<30} {_fmt(ev.mean_dice):>9} {_fmt(ev.mean_merged_dice):>7}" for name, ev in results.items()]
    lines.append("")
    lines.append(f"{'label':>5}  {'structure':<30} {'mean Dice':>9} {'subjects':>8}")
    for lab, v in means["dice"].items():
        n = sum(1 for ev in results.values() if lab in ev.dice)
        lines.append(f"{lab:>5}  {structure_name(lab):<30} {_fmt(v):>9} {n:>8}")
    lines.append(f"mean Dice over {len(results)} subjects: {_fmt(means['mean_dice'])}")
    lines.append(f"mean Dice, hemispheres merged: {_fmt(means['mean_merged_dice'])}")
    return "\n".join(lines)
