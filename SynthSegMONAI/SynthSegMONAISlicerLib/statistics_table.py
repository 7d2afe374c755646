"""Volumes from the engine -> ``vtkMRMLTableNode`` (and to CSV for export).

The engine's result line gives the soft volumes in mm^3 of the model's structures (the
numbers of SynthSeg's ``--vol`` CSV), each with its label value, and the total intracranial
volume when the model segments CSF. With ``--parc`` the labels also hold the cortical parcels
(FreeSurfer's 1000s/2000s), listed by their FreeSurfer names (``ctx-lh-*``, ``ctx-rh-*``), which
are also SynthSeg's names for them in the CSV.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import vtk

from SynthSegMONAILib import labels as label_table

from . import parcellation

TIV_HEADER = "total intracranial"
TIV_ATTRIBUTE = "SynthSegMONAI.TotalIntracranialVolume_mm3"
COLUMNS = ("Label", "Structure", "SynthSeg name", "Volume [mm3]", "Volume [mL]", "% of TIV")


@dataclass(frozen=True)
class StructureVolume:
    """Soft volume of one structure."""

    label: int
    name: str
    synthseg_name: str
    volume_mm3: float


@dataclass(frozen=True)
class VolumeReport:
    """Volumes of one image: per structure, and the total intracranial volume (or None)."""

    structures: list[StructureVolume]
    total_intracranial_mm3: float | None


def volume_report(labels: list[int], volumes_mm3: list[float],
                  total_intracranial_mm3: float | None = None) -> VolumeReport:
    """The volumes of one image as the engine's result line gives them: one per structure label
    (background left out), in the same order."""
    structure_labels = [lab for lab in labels if lab != 0]
    if len(structure_labels) != len(volumes_mm3):
        raise ValueError(f"{len(volumes_mm3)} volumes for a model with {len(structure_labels)} structures")
    names = [parcellation.parcel(lab).name if parcellation.is_parcel(lab) else label_table.csv_names([lab])[0]
             for lab in structure_labels]
    structures = [StructureVolume(lab, _freesurfer_name(lab), name, float(v))
                  for lab, name, v in zip(structure_labels, names, volumes_mm3, strict=True)]
    tiv = None if total_intracranial_mm3 is None else float(total_intracranial_mm3)
    return VolumeReport(structures, tiv)


def _freesurfer_name(label: int) -> str:
    if parcellation.is_parcel(label):
        return parcellation.parcel(label).name
    try:
        return label_table.structure(label).freesurfer_name
    except KeyError:
        return f"Label {label}"


def fill_table(scene, report: VolumeReport, name: str, table_node=None,
               present_labels: set[int] | None = None) -> object:
    """Create (or refill) a table node: one row per structure (only ``present_labels`` if given)."""
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    structures = [s for s in report.structures
                  if present_labels is None or s.label in present_labels]
    tiv = report.total_intracranial_mm3
    table = table_node.GetTable()
    was_modifying = table_node.StartModify()
    try:
        table_node.RemoveAllColumns()
        label_col = vtk.vtkIntArray()
        name_col, ss_col = vtk.vtkStringArray(), vtk.vtkStringArray()
        mm3_col, ml_col, pct_col = vtk.vtkDoubleArray(), vtk.vtkDoubleArray(), vtk.vtkDoubleArray()
        cols = [label_col, name_col, ss_col, mm3_col, ml_col] + ([pct_col] if tiv else [])
        for col, title in zip(cols, COLUMNS, strict=False):
            col.SetName(title)
            table_node.AddColumn(col)
        table.SetNumberOfRows(len(structures))
        for r, s in enumerate(structures):
            table.SetValue(r, 0, vtk.vtkVariant(s.label))
            table.SetValue(r, 1, vtk.vtkVariant(s.name))
            table.SetValue(r, 2, vtk.vtkVariant(s.synthseg_name))
            table.SetValue(r, 3, vtk.vtkVariant(s.volume_mm3))
            table.SetValue(r, 4, vtk.vtkVariant(s.volume_mm3 / 1000.0))
            if tiv:
                table.SetValue(r, 5, vtk.vtkVariant(100.0 * s.volume_mm3 / tiv))
        table_node.SetColumnUnitLabel("Volume [mm3]", "mm3")
        table_node.SetColumnUnitLabel("Volume [mL]", "mL")
        table_node.SetColumnDescription("Volume [mm3]", "Soft volume from the posteriors (as SynthSeg)")
        table_node.SetColumnDescription("Label", "FreeSurfer label value")
        if tiv:
            table_node.SetColumnUnitLabel("% of TIV", "%")
            table_node.SetColumnDescription("% of TIV", "Share of the total intracranial volume")
            table_node.SetAttribute(TIV_ATTRIBUTE, repr(tiv))
        else:
            table_node.RemoveAttribute(TIV_ATTRIBUTE)
        table_node.SetUseColumnTitleAsColumnHeader(True)
        table.Modified()
    finally:
        table_node.EndModify(was_modifying)
    return table_node


def table_rows(table_node) -> list[dict[str, object]]:
    """The table's rows as dictionaries (column title -> value)."""
    table = table_node.GetTable()
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    rows = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for c, n in enumerate(names):
            v = table.GetValue(r, c)
            row[n] = v.ToInt() if n == "Label" else (v.ToString() if v.IsString() else v.ToDouble())
        rows.append(row)
    return rows


def export_csv(table_node, path: str | os.PathLike) -> None:
    """Write the table as CSV, with a last row for the total intracranial volume if known."""
    rows = table_rows(table_node)
    table = table_node.GetTable()
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    tiv = table_node.GetAttribute(TIV_ATTRIBUTE)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        for row in rows:
            writer.writerow([_fmt(row[n]) for n in names])
        if tiv:
            t = float(tiv)
            extra = {"Label": "", "Structure": "Total intracranial", "SynthSeg name": TIV_HEADER,
                     "Volume [mm3]": _fmt(t), "Volume [mL]": _fmt(t / 1000.0), "% of TIV": "100"}
            writer.writerow([extra.get(n, "") for n in names])


def _fmt(v: object) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)
