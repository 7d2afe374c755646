"""SynthSeg 2.0's quality control scores (``--qc``) -> ``vtkMRMLTableNode``.

The engine's result line carries one score per QC group ({group name: score}, the numbers of
SynthSeg's ``--qc`` CSV: between 0 and 1, higher is better). The table has one row per group,
in SynthSeg's group order; groups the module does not know follow, by name.
"""

from __future__ import annotations

import csv
import os

import vtk

#: SynthSeg 2.0's QC groups in the order of its QC CSV (``synthseg_qc_names_2.0.npy`` without
#: the background, as the engine's ``synthseg2_networks.QC_NAMES[1:]``; the tests check they agree).
QC_GROUP_NAMES = ("general white matter", "general grey matter", "general csf", "cerebellum",
                  "brainstem", "thalamus", "putamen+pallidum", "hippocampus+amygdala")
COLUMNS = ("QC group", "Score")
QC_ATTRIBUTE = "SynthSegMONAI.QualityControl"


def ordered_scores(scores: dict[str, float]) -> list[tuple[str, float]]:
    """(group, score) pairs in SynthSeg's group order, unknown groups last (by name)."""
    known = [(name, float(scores[name])) for name in QC_GROUP_NAMES if name in scores]
    others = sorted((str(name), float(v)) for name, v in scores.items() if name not in QC_GROUP_NAMES)
    return known + others


def fill_qc_table(scene, scores: dict[str, float], name: str, table_node=None) -> object:
    """Create (or refill) a table node: one row per QC group with its score."""
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    rows = ordered_scores(scores)
    table = table_node.GetTable()
    was_modifying = table_node.StartModify()
    try:
        table_node.RemoveAllColumns()
        group_col, score_col = vtk.vtkStringArray(), vtk.vtkDoubleArray()
        for col, title in zip((group_col, score_col), COLUMNS, strict=True):
            col.SetName(title)
            table_node.AddColumn(col)
        table.SetNumberOfRows(len(rows))
        for r, (group, score) in enumerate(rows):
            table.SetValue(r, 0, vtk.vtkVariant(group))
            table.SetValue(r, 1, vtk.vtkVariant(score))
        table_node.SetColumnDescription("QC group", "SynthSeg 2.0 quality control group of structures")
        table_node.SetColumnDescription(
            "Score", "Quality control score predicted by SynthSeg 2.0 (0 to 1; higher is better)")
        table_node.SetAttribute(QC_ATTRIBUTE, "1")
        table_node.SetUseColumnTitleAsColumnHeader(True)
        table.Modified()
    finally:
        table_node.EndModify(was_modifying)
    return table_node


def qc_rows(table_node) -> list[tuple[str, float]]:
    """(group, score) of each row of a QC table."""
    table = table_node.GetTable()
    return [(table.GetValue(r, 0).ToString(), table.GetValue(r, 1).ToDouble())
            for r in range(table.GetNumberOfRows())]


def read_qc_csv(path: str | os.PathLike) -> dict[str, float]:
    """Scores of the first subject of a QC CSV in SynthSeg's layout (header ``subject,<group>...``,
    then one row per subject); ValueError when the file does not have that layout."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.reader(f) if row]
    if len(rows) < 2 or len(rows[0]) != len(rows[1]) or len(rows[0]) < 2:
        raise ValueError(f"{path}: not a QC CSV (a header, then one row per subject)")
    try:
        return {name: float(v) for name, v in zip(rows[0][1:], rows[1][1:], strict=True)}
    except ValueError as e:
        raise ValueError(f"{path}: not a QC CSV ({e})") from e


def lowest_score(scores: dict[str, float]) -> tuple[str, float] | None:
    """The group with the lowest score (None without scores)."""
    rows = ordered_scores(scores)
    return min(rows, key=lambda r: r[1]) if rows else None
