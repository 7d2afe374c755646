"""Label map from the engine -> ``vtkMRMLSegmentationNode`` with names, colours and codes.

Each segment keeps the FreeSurfer label value (``segment.GetLabelValue()``), is named with
the FreeSurfer name, coloured with the FreeSurfer colour, and carries a terminology entry:
the SNOMED CT code of the DICOM master list, with a laterality modifier where the master list
defines one for that structure, else an entry of the module's own terminology file
(``Resources/SynthSegMONAI.term.json``). Cortical parcels (``--parc``, labels 1001-2035) get
FreeSurfer's ``ctx-lh-*``/``ctx-rh-*`` names and colours and an entry of the module's own
terminology whose anatomic region is the cerebral cortex of their side (:mod:`.parcellation`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import slicer
import vtk

from SynthSegMONAILib import labels as label_table

from . import parcellation

DICOM_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
CUSTOM_CONTEXT = "Segmentation category and type - SynthSegMONAI"
CUSTOM_SCHEME = "99SYNTHSEG"
ANATOMICAL_STRUCTURE = "SCT^123037004^Anatomical Structure"
LATERALITY_CODES = {"Left": "SCT^7771000^Left", "Right": "SCT^24028007^Right"}
# Anatomic region of the cortical parcels (in the DICOM master list of anatomic regions, with
# Left/Right modifiers).
CEREBRAL_CORTEX_REGION = "SCT^40146001^Cerebral cortex"
# Types that the DICOM master list defines without any modifier: their left and right
# segments get no laterality (Slicer would not find the entry otherwise). Checked against
# the master list by the tests.
TYPES_WITHOUT_MODIFIERS = {
    "33060004",  # Cerebellar white matter
    "49841001",  # Third ventricle
    "35918002",  # Fourth ventricle
    "119238007",  # Brain stem
}

# Structures of the label table without a code in the DICOM master list: private codes,
# declared in Resources/SynthSegMONAI.term.json (same values there).
CUSTOM_CODES = {
    "Inferior horn of lateral ventricle": "1",
    "Cerebellar cortex": "2",
    "Ventral diencephalon": "3",
}


def parcel_terminology_entry(label: int) -> str:
    """Terminology entry of a cortical parcel: the region's type in the module's terminology
    with the side as modifier, and the cerebral cortex of that side as anatomic region."""
    p = parcellation.parcel(label)
    side = LATERALITY_CODES[p.laterality]
    type_code = f"{CUSTOM_SCHEME}^{p.region.code}^{p.region.code_meaning}"
    return (f"{CUSTOM_CONTEXT}~{ANATOMICAL_STRUCTURE}~{type_code}~{side}~{ANATOMIC_CONTEXT}"
            f"~{CEREBRAL_CORTEX_REGION}~{side}")


def terminology_entry(label: int) -> str:
    """Slicer terminology entry string of a SynthSeg label or cortical parcel ('' for unknown labels)."""
    if parcellation.is_parcel(label):
        return parcel_terminology_entry(label)
    try:
        s = label_table.structure(label)
    except KeyError:
        return ""
    if label == 0:
        return ""
    modifier = "^^" if s.snomed_code in TYPES_WITHOUT_MODIFIERS else LATERALITY_CODES.get(s.laterality, "^^")
    if s.snomed_code:
        context, type_code = DICOM_CONTEXT, f"SCT^{s.snomed_code}^{s.snomed_meaning}"
    else:
        code = CUSTOM_CODES.get(s.snomed_meaning)
        if code is None:
            return ""
        context, type_code = CUSTOM_CONTEXT, f"{CUSTOM_SCHEME}^{code}^{s.snomed_meaning}"
    return f"{context}~{ANATOMICAL_STRUCTURE}~{type_code}~{modifier}~{ANATOMIC_CONTEXT}~^^~^^"


def segment_name(label: int) -> str:
    """Segment name: the FreeSurfer name, or ``Label <n>`` outside the SynthSeg table and parcels."""
    if parcellation.is_parcel(label):
        return parcellation.parcel(label).name
    try:
        return label_table.structure(label).freesurfer_name
    except KeyError:
        return f"Label {label}"


def segment_color(label: int) -> tuple[float, float, float]:
    """FreeSurfer colour (0..1), grey outside the SynthSeg table and parcels."""
    if parcellation.is_parcel(label):
        return tuple(c / 255.0 for c in parcellation.parcel(label).color)
    try:
        return tuple(c / 255.0 for c in label_table.structure(label).color)
    except KeyError:
        return (0.5, 0.5, 0.5)


def _matrix(array4x4: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array4x4[r, c]))
    return m


def import_labelmap(scene, label_ijk: np.ndarray, ijk_to_ras: np.ndarray, name: str,
                    reference_volume=None, segmentation_node=None,
                    present_labels: Sequence[int] | None = None) -> object:
    """Create (or refill) a segmentation node from a label array indexed [i, j, k].

    ``ijk_to_ras`` is the label map's own voxel-to-RAS matrix. ``present_labels``: the nonzero
    labels of the array when already known (the engine's result line gives them), else they are
    found. Temporary nodes used for the conversion are removed; on error the scene is left as
    it was.
    """
    label_ijk = np.asarray(label_ijk)
    if present_labels is None:
        present = [int(v) for v in np.unique(label_ijk) if v != 0]
    else:
        present = sorted({int(v) for v in present_labels} - {0})
    max_label = max(present, default=0)

    color_node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", f"{name} colours (temporary)")
    labelmap = display = None
    created = segmentation_node is None
    try:
        color_node.SetTypeToUser()
        color_node.SetNumberOfColors(max_label + 1)
        color_node.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
        for v in range(1, max_label + 1):
            color_node.SetColor(v, segment_name(v) if v in present else "", *segment_color(v), 1.0)

        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{name} labels (temporary)")
        labelmap.SetIJKToRASMatrix(_matrix(ijk_to_ras))
        kji = np.ascontiguousarray(label_ijk.transpose(2, 1, 0).astype(np.int16))
        slicer.util.updateVolumeFromArray(labelmap, kji)
        display = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeDisplayNode")
        display.SetAndObserveColorNodeID(color_node.GetID())
        labelmap.SetAndObserveDisplayNodeID(display.GetID())

        if created:
            segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            segmentation_node.CreateDefaultDisplayNodes()
        else:
            segmentation_node.GetSegmentation().RemoveAllSegments()
        if reference_volume is not None:
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            labelmap, segmentation_node)
        if not ok:
            raise RuntimeError("Slicer could not import the label map into a segmentation")
        segmentation = segmentation_node.GetSegmentation()
        for i in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(i)
            label = segment.GetLabelValue()
            segment.SetName(segment_name(label))
            segment.SetColor(*segment_color(label))
            entry = terminology_entry(label)
            if entry:
                segment.SetTerminology(entry)
            segment.SetTag("SynthSegMONAI.LabelValue", str(label))
    except Exception:
        if created and segmentation_node is not None:
            scene.RemoveNode(segmentation_node)
        raise
    finally:
        for node in (labelmap, display):
            if node is not None:
                scene.RemoveNode(node)
        scene.RemoveNode(color_node)
    return segmentation_node


def place_in_subject_hierarchy(scene, node, reference_node) -> None:
    """Put ``node`` next to ``reference_node`` (same study/patient) in the subject hierarchy."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None or reference_node is None:
        return
    ref_item = sh.GetItemByDataNode(reference_node)
    if not ref_item:
        return
    parent = sh.GetItemParent(ref_item)
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, parent)
    else:
        sh.CreateItem(parent, node)
