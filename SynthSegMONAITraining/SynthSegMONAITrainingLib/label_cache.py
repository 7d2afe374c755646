"""A compact cache of training label maps: one compressed ``.npz`` file, small enough to carry.

Each map is stored as it is used for training: reoriented to RAS, cropped to its labels plus a
margin, as ``uint8`` indices into the generation table (``generation_labels`` is stored too, so a
cache made with another table is remapped or refused). The 20 SynthSeg maps make about 10 MB.
The file is read with ``allow_pickle=False``: only plain arrays, never pickled objects.

    python SynthSegMONAITraining/make_label_cache.py MAPS_DIR -o label_maps.npz
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from SynthSegMONAILib.output_files import atomic_output

from .label_maps import (
    GenerationTable,
    LabelMap,
    LabelMapError,
    crop_to_labels,
    find_label_maps,
    load_generation_table,
    read_label_array,
    to_generation_indices,
)

CACHE_SUFFIX = ".npz"
CACHE_FORMAT = "synthseg-monai-label-cache-1"
#: a cache holds at most this many voxels in all (refuses decompression bombs)
MAX_CACHE_VOXELS = 2_000_000_000


def is_label_cache(source: str | os.PathLike) -> bool:
    """Whether ``source`` names a label-map cache file (rather than a folder or glob of maps)."""
    return str(source).endswith(CACHE_SUFFIX) and Path(source).is_file()


def make_label_cache(source: str, output: str | os.PathLike, table: GenerationTable | None = None,
                     margin: int = 8) -> Path:
    """Read every map of ``source`` (folder or glob), crop it and write the cache atomically."""
    table = table or load_generation_table("2.0")
    files = find_label_maps(source)
    arrays: dict[str, np.ndarray] = {
        "format": np.asarray(CACHE_FORMAT),
        "generation_labels": np.asarray(table.labels, dtype=np.int32),
        "names": np.asarray([f.name for f in files]),
    }
    for i, f in enumerate(files):
        data, zooms = read_label_array(f)
        arrays[f"map_{i:04d}"] = np.ascontiguousarray(crop_to_labels(to_generation_indices(data, table, str(f)),
                                                                     margin))
        arrays[f"voxel_size_{i:04d}"] = np.asarray(zooms, dtype=np.float64)
    output = Path(output)
    with atomic_output(output, suffix=".tmp.npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    return output


def load_label_cache(path: str | os.PathLike, table: GenerationTable, device: torch.device | str = "cpu",
                     downsample: int = 1) -> list[LabelMap]:
    """The maps of a cache file, as :class:`LabelMap` (sorted by name, as a folder is)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z.files or str(z["format"]) != CACHE_FORMAT:
                raise LabelMapError(f"{path} is not a label-map cache (made by make_label_cache.py)")
            total = 0
            for name in z.files:
                if name.startswith("map_"):
                    shape = _stored_shape(z, name)
                    total += int(np.prod(shape))
            if total > MAX_CACHE_VOXELS:
                raise LabelMapError(f"{path}: the cache holds {total} voxels, more than the "
                                    f"{MAX_CACHE_VOXELS} allowed")
            stored = z["generation_labels"].astype(np.int64)
            names = [str(n) for n in z["names"]]
            maps = []
            for i, name in enumerate(names):
                indices = z[f"map_{i:04d}"]
                zooms = tuple(float(v) for v in z[f"voxel_size_{i:04d}"])
                maps.append(_to_map(name, indices, zooms, stored, table, device, downsample, path))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise LabelMapError(f"cannot read label-map cache {path}: {e}") from e
    if not maps:
        raise LabelMapError(f"{path} holds no label maps")
    return sorted(maps, key=lambda m: m.name)


def _stored_shape(z, name: str) -> tuple[int, ...]:
    """Shape of an array in the archive, read from its header without decompressing the data."""
    with z.zip.open(f"{name}.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
    if dtype != np.uint8 or len(shape) != 3:
        raise LabelMapError(f"{name} is not a 3D uint8 map")
    return shape


def _to_map(name: str, indices: np.ndarray, zooms, stored: np.ndarray, table: GenerationTable, device,
            downsample: int, path: Path) -> LabelMap:
    if indices.dtype != np.uint8 or indices.ndim != 3:
        raise LabelMapError(f"{path}: map {name} is not a 3D uint8 array")
    if int(indices.max()) >= len(stored):
        raise LabelMapError(f"{path}: map {name} indexes past the stored generation labels")
    if not np.array_equal(stored, table.labels):
        index = {int(lab): i for i, lab in enumerate(table.labels)}
        missing = sorted(int(v) for v in set(stored[np.unique(indices)].tolist()) - set(index))
        if missing:
            raise LabelMapError(f"{path}: map {name} holds labels {missing} that the generation table lacks")
        lut = np.asarray([index.get(int(v), 0) for v in stored], dtype=np.uint8)
        indices = lut[indices]
    if downsample > 1:
        indices = indices[::downsample, ::downsample, ::downsample]
        zooms = tuple(z * downsample for z in zooms)
    return LabelMap(name, torch.from_numpy(np.ascontiguousarray(indices)).to(device), zooms)


def main(argv: list[str] | None = None) -> int:
    """``make_label_cache.py MAPS -o FILE.npz``."""
    p = argparse.ArgumentParser(prog="make_label_cache.py",
                                description="Make the compact label-map cache that train_round.py carries.")
    p.add_argument("maps", help="folder (or glob) of label maps (.nii, .nii.gz, .mgz)")
    p.add_argument("-o", "--output", required=True, help="cache file to write (.npz)")
    p.add_argument("--margin", type=int, default=8, help="voxels kept around the labels (default 8)")
    args = p.parse_args(argv)
    if not args.output.endswith(CACHE_SUFFIX):
        print(f"error: the cache file name must end with {CACHE_SUFFIX}", file=sys.stderr)
        return 2
    try:
        out = make_label_cache(args.maps, args.output, margin=args.margin)
    except (LabelMapError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = len(np.load(out, allow_pickle=False)["names"])
    print(f"{out}: {n} maps, {out.stat().st_size / 2**20:.1f} MiB")
    return 0
