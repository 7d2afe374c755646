"""The SynthSeg label table: values, names, colours, codes, left/right pairs, classes.

One CSV file (``synthseg_labels.csv``, kept in the extension's ``Resources/`` folder and
shipped inside the package) is the single source of truth for engine and Slicer alike.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .resource_files import resource_path

LABEL_TABLE_NAME = "synthseg_labels.csv"

#: Parcellation output labels in channel order (``synthseg_parcellation_labels.npy``, sorted).
PARCELLATION_LABELS = (0, *(h + i for h in (1000, 2000) for i in range(1, 36) if i != 4))
_PARC_REGIONS = ("bankssts", "caudalanteriorcingulate", "caudalmiddlefrontal", "cuneus", "entorhinal",
                 "fusiform", "inferiorparietal", "inferiortemporal", "isthmuscingulate", "lateraloccipital",
                 "lateralorbitofrontal", "lingual", "medialorbitofrontal", "middletemporal",
                 "parahippocampal", "paracentral", "parsopercularis", "parsorbitalis", "parstriangularis",
                 "pericalcarine", "postcentral", "posteriorcingulate", "precentral", "precuneus",
                 "rostralanteriorcingulate", "rostralmiddlefrontal", "superiorfrontal", "superiorparietal",
                 "superiortemporal", "supramarginal", "frontalpole", "temporalpole", "transversetemporal",
                 "insula")
#: Names of :data:`PARCELLATION_LABELS` (``synthseg_parcellation_names.npy``), as in the CSV.
PARCELLATION_NAMES = ("Background", *(f"ctx-{h}-{r}" for h in ("lh", "rh") for r in _PARC_REGIONS))


@dataclass(frozen=True)
class Structure:
    """One SynthSeg output structure."""

    label: int
    freesurfer_name: str
    synthseg_name: str
    color: tuple[int, int, int]
    snomed_code: str
    snomed_meaning: str
    laterality: str
    lr_pair: int | None
    topological_class: int
    in_v1: bool


def label_table_path() -> Path:
    """Location of the label table."""
    return resource_path(LABEL_TABLE_NAME, Path(__file__).parent)


@functools.lru_cache(maxsize=1)
def all_structures() -> tuple[Structure, ...]:
    """Every structure of SynthSeg 2.0 (33 labels, background included), by label value."""
    with open(label_table_path(), newline="") as f:
        rows = list(csv.DictReader(f))
    structures = [
        Structure(
            label=int(r["label"]),
            freesurfer_name=r["freesurfer_name"],
            synthseg_name=r["synthseg_name"],
            color=(int(r["R"]), int(r["G"]), int(r["B"])),
            snomed_code=r["snomed_type_code"],
            snomed_meaning=r["snomed_type_meaning"],
            laterality=r["laterality"],
            lr_pair=int(r["lr_pair"]) if r["lr_pair"] else None,
            topological_class=int(r["topological_class"]),
            in_v1=r["in_v1"] == "1",
        )
        for r in rows
    ]
    return tuple(sorted(structures, key=lambda s: s.label))


def structure(label: int) -> Structure:
    """The structure with this FreeSurfer label value."""
    for s in all_structures():
        if s.label == label:
            return s
    raise KeyError(f"label {label} is not a SynthSeg structure")


def synthseg_labels(version: str = "2.0") -> list[int]:
    """Output label values in channel order (ascending): 32 for 1.0, 33 for 2.0 (with CSF)."""
    if version not in ("1.0", "2.0"):
        raise ValueError(f"unknown SynthSeg version {version!r}")
    return [s.label for s in all_structures() if version == "2.0" or s.in_v1]


def flip_indices(labels: list[int]) -> np.ndarray:
    """For each channel, the channel holding its left/right counterpart (itself if unpaired)."""
    index = {lab: i for i, lab in enumerate(labels)}
    out = np.arange(len(labels))
    for i, lab in enumerate(labels):
        pair = structure(lab).lr_pair if lab in _known_labels() else None
        if pair is not None and pair in index:
            out[i] = index[pair]
    return out


def topological_classes(labels: list[int]) -> np.ndarray:
    """Topological class per channel (0: never postprocessed, i.e. background and CSF).

    Labels outside the SynthSeg table each get a class of their own.
    """
    known = _known_labels()
    next_class = max(s.topological_class for s in all_structures()) + 1
    out = []
    for lab in labels:
        if lab in known:
            out.append(structure(lab).topological_class)
        else:
            out.append(next_class)
            next_class += 1
    return np.asarray(out, dtype=np.int64)


def csv_names(labels: list[int]) -> list[str]:
    """Structure names as SynthSeg writes them in the ``--vol`` CSV header (the parcels of
    ``--parc`` by their ``ctx-lh-*``/``ctx-rh-*`` names)."""
    known = _known_labels()
    parcels = dict(zip(PARCELLATION_LABELS, PARCELLATION_NAMES))
    return [structure(lab).synthseg_name if lab in known else parcels.get(lab, f"label {lab}") for lab in labels]


def check_label_list(labels: list[int]) -> None:
    """Raise ValueError unless ``labels`` is a valid output label list for a model."""
    if len(labels) < 2:
        raise ValueError("a model needs at least two output labels")
    if labels[0] != 0:
        raise ValueError("the first output label must be 0 (background)")
    if len(set(labels)) != len(labels):
        raise ValueError("output labels are not unique")
    if list(labels) != sorted(labels):
        raise ValueError("output labels must be in ascending order")
    if any(lab < 0 for lab in labels):
        raise ValueError("output labels must be non-negative")
    known = _known_labels()
    for lab in labels:
        if lab in known:
            pair = structure(lab).lr_pair
            if pair is not None and pair not in labels:
                raise ValueError(f"label {lab} is present but its left/right pair {pair} is not")


@functools.lru_cache(maxsize=1)
def _known_labels() -> frozenset[int]:
    return frozenset(s.label for s in all_structures())
