"""SynthSeg 2.0's cortical parcels (``--parc``): label values, FreeSurfer names, colours, codes.

With ``--parc`` the engine replaces the cerebral cortex (labels 3 and 42) by the 68 parcels of
the Desikan-Killiany atlas, with FreeSurfer's ``aparc+aseg`` label values: 1000 + index on the
left hemisphere (``ctx-lh-*``), 2000 + index on the right (``ctx-rh-*``); index 4 (corpus
callosum) is not segmented. Names are SynthSeg's (``synthseg_parcellation_names.npy``, as the
engine's ``synthseg2_networks.PARCELLATION_NAMES``; the tests check they agree).

Colours are FreeSurfer's: ``distribution/FreeSurferColorLUT.txt`` of github freesurfer/freesurfer
(commit 62228baedd5c5914333d31211e3e02759faed287), entries 1001-1035 and 2001-2035 (the two
hemispheres share one colour per region).

The DICOM master list has no codes for these regions: each region is a type of the module's
own terminology (``Resources/SynthSegMONAI.term.json``, scheme ``99SYNTHSEG``, code
``100 + index``) with a Left/Right modifier, and its anatomic region is the cerebral cortex of
that side (SNOMED CT 40146001, in the DICOM master list of anatomic regions).

Standard library only: the Slicer side imports it without PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Label offset of each hemisphere: (FreeSurfer's hemisphere tag, laterality).
HEMISPHERES = {1000: ("lh", "Left"), 2000: ("rh", "Right")}
#: The custom terminology code of a region is this plus its FreeSurfer index.
CODE_OFFSET = 100
#: Segmentation labels the parcels replace (left and right cerebral cortex).
CORTEX_LABELS = (3, 42)

# (FreeSurfer index, FreeSurfer region name, code meaning, FreeSurferColorLUT colour), in the
# order of SynthSeg's parcellation names. Code meanings are the Desikan-Killiany region names.
_REGIONS: tuple[tuple[int, str, str, tuple[int, int, int]], ...] = (
    (1, "bankssts", "Banks of superior temporal sulcus", (25, 100, 40)),
    (2, "caudalanteriorcingulate", "Caudal anterior cingulate cortex", (125, 100, 160)),
    (3, "caudalmiddlefrontal", "Caudal middle frontal gyrus", (100, 25, 0)),
    (5, "cuneus", "Cuneus", (220, 20, 100)),
    (6, "entorhinal", "Entorhinal cortex", (220, 20, 10)),
    (7, "fusiform", "Fusiform gyrus", (180, 220, 140)),
    (8, "inferiorparietal", "Inferior parietal cortex", (220, 60, 220)),
    (9, "inferiortemporal", "Inferior temporal gyrus", (180, 40, 120)),
    (10, "isthmuscingulate", "Isthmus of cingulate gyrus", (140, 20, 140)),
    (11, "lateraloccipital", "Lateral occipital cortex", (20, 30, 140)),
    (12, "lateralorbitofrontal", "Lateral orbitofrontal cortex", (35, 75, 50)),
    (13, "lingual", "Lingual gyrus", (225, 140, 140)),
    (14, "medialorbitofrontal", "Medial orbitofrontal cortex", (200, 35, 75)),
    (15, "middletemporal", "Middle temporal gyrus", (160, 100, 50)),
    (16, "parahippocampal", "Parahippocampal gyrus", (20, 220, 60)),
    (17, "paracentral", "Paracentral lobule", (60, 220, 60)),
    (18, "parsopercularis", "Pars opercularis of inferior frontal gyrus", (220, 180, 140)),
    (19, "parsorbitalis", "Pars orbitalis of inferior frontal gyrus", (20, 100, 50)),
    (20, "parstriangularis", "Pars triangularis of inferior frontal gyrus", (220, 60, 20)),
    (21, "pericalcarine", "Pericalcarine cortex", (120, 100, 60)),
    (22, "postcentral", "Postcentral gyrus", (220, 20, 20)),
    (23, "posteriorcingulate", "Posterior cingulate cortex", (220, 180, 220)),
    (24, "precentral", "Precentral gyrus", (60, 20, 220)),
    (25, "precuneus", "Precuneus", (160, 140, 180)),
    (26, "rostralanteriorcingulate", "Rostral anterior cingulate cortex", (80, 20, 140)),
    (27, "rostralmiddlefrontal", "Rostral middle frontal gyrus", (75, 50, 125)),
    (28, "superiorfrontal", "Superior frontal gyrus", (20, 220, 160)),
    (29, "superiorparietal", "Superior parietal cortex", (20, 180, 140)),
    (30, "superiortemporal", "Superior temporal gyrus", (140, 220, 220)),
    (31, "supramarginal", "Supramarginal gyrus", (80, 160, 20)),
    (32, "frontalpole", "Frontal pole", (100, 0, 100)),
    (33, "temporalpole", "Temporal pole", (70, 70, 70)),
    (34, "transversetemporal", "Transverse temporal gyrus", (150, 150, 200)),
    (35, "insula", "Insula", (255, 192, 32)),
)


@dataclass(frozen=True)
class Region:
    """One Desikan-Killiany region (both hemispheres)."""

    index: int
    freesurfer_region: str
    code_meaning: str
    color: tuple[int, int, int]

    @property
    def code(self) -> str:
        """Code value in the module's terminology (scheme ``99SYNTHSEG``)."""
        return str(CODE_OFFSET + self.index)

    @property
    def slicer_label(self) -> str:
        """``3dSlicerLabel`` of the region's terminology type."""
        return "cortical_parcel_" + self.freesurfer_region


@dataclass(frozen=True)
class Parcel:
    """One cortical parcel: a region on one hemisphere."""

    label: int
    name: str
    region: Region
    laterality: str

    @property
    def color(self) -> tuple[int, int, int]:
        return self.region.color


REGIONS: tuple[Region, ...] = tuple(Region(*r) for r in _REGIONS)

PARCELS: tuple[Parcel, ...] = tuple(
    Parcel(offset + r.index, f"ctx-{hemi}-{r.freesurfer_region}", r, side)
    for offset, (hemi, side) in HEMISPHERES.items() for r in REGIONS)
_BY_LABEL = {p.label: p for p in PARCELS}

#: Parcel label values in ascending order (the engine's ``PARCELLATION_LABELS`` less background).
PARCEL_LABELS: tuple[int, ...] = tuple(p.label for p in PARCELS)


def is_parcel(label: int) -> bool:
    """True for a cortical parcel's label value."""
    return label in _BY_LABEL


def parcel(label: int) -> Parcel:
    """The parcel with this label value (KeyError for any other label)."""
    try:
        return _BY_LABEL[label]
    except KeyError:
        raise KeyError(f"label {label} is not a cortical parcel") from None
