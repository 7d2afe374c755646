"""Training label maps: the generation-label table, reading maps as integers, a compact cache.

A label map holds SynthSeg's generation labels (FreeSurfer aseg values plus extra-cerebral,
lesion and split-ventricle labels). Each map is read as integers (maps stored as float are
checked to hold whole numbers), reoriented to the closest RAS orientation (as SynthSeg aligns
its training maps to the identity affine), cropped to the labels' bounding box plus a margin
and kept as a compact ``uint8`` tensor of *indices* into the generation table, on the
training device.
"""

from __future__ import annotations

import csv
import glob
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from SynthSegMONAILib import synthseg_labels
from SynthSegMONAILib.resource_files import resource_path

GENERATION_TABLE_NAME = "synthseg_generation_labels.csv"
LABEL_MAP_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")
WHERE_TO_GET_MAPS = ("SynthSeg's 20 training label maps are in its repository: "
                     "https://github.com/BBillot/SynthSeg, folder data/training_label_maps (Apache-2.0)")


class LabelMapError(ValueError):
    """A label map (or the set of them) cannot be used for training."""


def generation_table_path() -> Path:
    """Location of the generation table."""
    return resource_path(GENERATION_TABLE_NAME, Path(__file__).parent)


@dataclass(frozen=True)
class GenerationTable:
    """Generation labels with their GMM class, target label and left/right counterpart."""

    labels: np.ndarray  #: generation label values (G,)
    classes: np.ndarray  #: GMM class of each generation label (G,)
    targets: np.ndarray  #: output label value of each generation label (G,)
    lr_swap: np.ndarray  #: index of each generation label's left/right counterpart (G,)
    target_labels: list[int]  #: output labels in channel order

    @property
    def n_classes(self) -> int:
        return int(self.classes.max()) + 1

    def target_channels(self) -> np.ndarray:
        """Output channel of each generation label (G,)."""
        index = {lab: i for i, lab in enumerate(self.target_labels)}
        return np.asarray([index[int(t)] for t in self.targets], dtype=np.int64)


def load_generation_table(version: str = "1.0", path: str | Path | None = None) -> GenerationTable:
    """Read the generation table for SynthSeg ``version`` (1.0: 32 targets, 2.0: 33)."""
    path = Path(path) if path else generation_table_path()
    if not path.is_file():
        raise LabelMapError(f"generation table not found: {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    column = "target_v1" if version == "1.0" else "target_v2"
    try:
        labels = np.asarray([int(r["generation_label"]) for r in rows])
        classes = np.asarray([int(r["gmm_class"]) for r in rows])
        targets = np.asarray([int(r[column]) for r in rows])
        pairs = [int(r["lr_pair"]) if r.get("lr_pair") else None for r in rows]
    except (KeyError, ValueError) as e:
        raise LabelMapError(f"{path}: bad generation table ({e})") from e
    if len(set(labels.tolist())) != len(labels) or len(labels) > 255:
        raise LabelMapError(f"{path}: generation labels must be unique and at most 255")
    index = {int(lab): i for i, lab in enumerate(labels)}
    swap = np.asarray([index.get(p, i) if p is not None else i for i, p in enumerate(pairs)])
    target_labels = synthseg_labels(version)
    missing = sorted(set(targets.tolist()) - set(target_labels))
    if missing:
        raise LabelMapError(f"{path}: targets {missing} are not SynthSeg {version} labels")
    return GenerationTable(labels, classes, targets, swap, target_labels)


@dataclass
class LabelMap:
    """One cached map: generation-label indices (uint8, RAS, cropped) and its voxel size."""

    name: str
    indices: torch.Tensor  #: (X, Y, Z) uint8
    voxel_size: tuple[float, float, float]


def find_label_maps(source: str) -> list[Path]:
    """Label-map files in a folder (sorted by name), or those matching a glob pattern."""
    if not source:
        raise LabelMapError("no label maps given (set data.label_maps or --label-maps). " + WHERE_TO_GET_MAPS)
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.name.endswith(LABEL_MAP_SUFFIXES))
        if not files:
            raise LabelMapError(f"no label maps (*.nii, *.nii.gz, *.mgz) in {p}. " + WHERE_TO_GET_MAPS)
        return files
    if any(c in source for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(source) if f.endswith(LABEL_MAP_SUFFIXES))
        if not files:
            raise LabelMapError(f"no label maps match {source}")
        return files
    if p.is_file():
        return [p]
    raise LabelMapError(f"label-map folder not found: {source}")


def read_label_array(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a label map as int32, reoriented to the closest RAS orientation."""
    try:
        img = nib.load(str(path))
        shape = img.shape
    except Exception as e:  # nibabel raises many kinds of errors for damaged files
        raise LabelMapError(f"cannot read label map {path}: {e}") from e
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
    elif len(shape) != 3:
        raise LabelMapError(f"label map {path} is not a 3D volume (shape {shape})")
    try:
        img = nib.as_closest_canonical(img)
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise LabelMapError(f"cannot read label map {path}: {e}") from e
    if data.size == 0:
        raise LabelMapError(f"label map {path} is empty")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)):
            raise LabelMapError(f"label map {path} holds NaN or infinite values")
        rounded = np.rint(data)
        if np.max(np.abs(rounded - data)) > 1e-3:
            raise LabelMapError(f"label map {path} holds non-integer values: is it an image?")
        data = rounded
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return data.astype(np.int32), zooms


def to_generation_indices(data: np.ndarray, table: GenerationTable, name: str) -> np.ndarray:
    """Replace label values by their index in the generation table (uint8)."""
    values = np.unique(data)
    unknown = sorted(set(values.tolist()) - set(table.labels.tolist()))
    if unknown:
        raise LabelMapError(f"label map {name} holds labels that are not generation labels: "
                            f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    if len(values) < 2:
        raise LabelMapError(f"label map {name} is empty (only label {values[0]})")
    lut = np.zeros(int(values.max()) + 1, dtype=np.uint8)
    for i, lab in enumerate(table.labels):
        if lab <= values.max():
            lut[lab] = i
    return lut[data]


def crop_to_labels(indices: np.ndarray, margin: int) -> np.ndarray:
    """Crop to the bounding box of non-background labels plus ``margin`` voxels."""
    nz = np.nonzero(indices)
    lo = [max(int(a.min()) - margin, 0) for a in nz]
    hi = [min(int(a.max()) + 1 + margin, s) for a, s in zip(nz, indices.shape)]
    return indices[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]


def load_label_map(path: Path, table: GenerationTable, device: torch.device | str = "cpu",
                   downsample: int = 1, margin: int = 8) -> LabelMap:
    """Read, check, reorient, downsample, crop and cache one label map."""
    data, zooms = read_label_array(path)
    if downsample > 1:
        data = data[::downsample, ::downsample, ::downsample]
        zooms = tuple(z * downsample for z in zooms)
    indices = crop_to_labels(to_generation_indices(data, table, str(path)), margin)
    return LabelMap(path.name, torch.from_numpy(np.ascontiguousarray(indices)).to(device), zooms)


def split_maps(files: list, n_validation: int, rank: int, world_size: int) -> tuple[list, list]:
    """This rank's disjoint share of the training maps (files or loaded maps, sorted by name),
    and the held-out validation maps (the last ``n_validation``)."""
    if n_validation >= len(files):
        raise LabelMapError(f"{len(files)} label map(s) found: need more than the "
                            f"{n_validation} held out for validation")
    train = files[:len(files) - n_validation]
    val = files[len(files) - n_validation:]
    if len(train) < world_size:
        raise LabelMapError(f"{len(train)} training label map(s) for {world_size} processes: "
                            "each process needs at least one map of its own")
    return train[rank::world_size], val
