"""End to end under slicer-core: volume node -> engine command line -> segmentation + table.

A tiny model made here maps intensity levels to labels, so the expected segmentation of the
phantom is known in physical space whatever the input grid (RAS, LPS, oblique, left-handed,
5 mm slices).
"""

from __future__ import annotations

import csv
import os
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import slicer
import slicer_fixtures as fx
import vtk
from slicer_fixtures import add_volume, centred_affine, rotation, scene_node_ids
from vtk.util import numpy_support

from SynthSegMONAILib import labels as label_table
from SynthSegMONAISlicerLib import statistics_table
from SynthSegMONAISlicerLib.errors import SegmentationError
from SynthSegMONAISlicerLib.job_state import JobState
from SynthSegMONAISlicerLib.options import SegmentOptions
from SynthSegMONAISlicerLib.segment_job import SegmentationJob
from SynthSegMONAISlicerLib.segmentation_import import terminology_entry
from SynthSegMONAISlicerLib.testing import PHANTOM_LEVELS, expected_labels, phantom, voxel_centres_ras

scene, tiny_model = fx.scene, fx.tiny_model

pytestmark = pytest.mark.skipif(
    not (fx.MODULE_DIR / "SynthSegMONAILib" / "cli.py").exists(),
    reason="the engine's command line is not there yet")

CASES = {
    "RAS": ((40, 40, 40), (1.0, 1.0, 1.0), np.eye(3)),
    "LPS": ((40, 36, 40), (1.0, 1.1, 1.0), np.diag([-1.0, -1.0, 1.0])),
    "oblique": ((36, 36, 36), (1.2, 1.2, 1.2), rotation("z", 30) @ rotation("x", 20)),
    "left-handed": ((40, 40, 40), (1.0, 1.0, 1.0), np.diag([-1.0, 1.0, 1.0])),
    "thick-slices": ((44, 44, 10), (1.0, 1.0, 5.0), np.eye(3)),
}


def segment_masks_on_grid(seg_node, shape, ijk_to_ras) -> dict[int, np.ndarray]:
    """Each segment sampled at the input's voxel centres (nearest voxel), by label value."""
    ras = voxel_centres_ras(shape, ijk_to_ras).reshape(-1, 3)
    ras_h = np.c_[ras, np.ones(len(ras))]
    segmentation = seg_node.GetSegmentation()
    masks = {}
    for i in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(i)
        lm = slicer.vtkOrientedImageData()
        seg_node.GetBinaryLabelmapRepresentation(sid, lm)
        m = vtk.vtkMatrix4x4()
        lm.GetImageToWorldMatrix(m)
        ijk = np.rint((np.linalg.inv(slicer.util.arrayFromVTKMatrix(m)) @ ras_h.T).T[:, :3]).astype(int)
        ext = lm.GetExtent()
        arr = numpy_support.vtk_to_numpy(lm.GetPointData().GetScalars())
        dims = [ext[1] - ext[0] + 1, ext[3] - ext[2] + 1, ext[5] - ext[4] + 1]
        vol = arr.reshape(dims[2], dims[1], dims[0]).transpose(2, 1, 0)
        rel = ijk - np.array([ext[0], ext[2], ext[4]])
        inside = np.all((rel >= 0) & (rel < np.array(dims)), axis=1)
        out = np.zeros(len(ras), bool)
        r = rel[inside]
        out[inside] = vol[r[:, 0], r[:, 1], r[:, 2]] > 0
        masks[segmentation.GetSegment(sid).GetLabelValue()] = out.reshape(shape)
    return masks


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


@pytest.mark.parametrize("case", list(CASES))
def test_segment_overlays_the_input_in_physical_space(scene, tiny_model, tmp_path, case):
    shape, spacing, axes = CASES[case]
    m = centred_affine(shape, spacing, axes)
    m[:3, 3] += (30.0, -12.0, 7.0)  # the head is not at the origin
    centre = tuple(m[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + m[:3, 3])
    intensity = phantom(shape, m, centre_ras=centre)
    volume = add_volume(scene, intensity, m, "T1 phantom")
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient"), "Study")
    sh.CreateItem(study, volume)
    work = tmp_path / "work"
    work.mkdir()
    stages = []
    job = SegmentationJob(scene, volume, SegmentOptions(model=str(tiny_model), device="cpu", threads=1),
                          temp_root=work, on_progress=lambda f, s: stages.append((f, s)))
    job.start()
    result = job.wait(timeout=300)
    assert job.state is JobState.DONE
    seg = result.segmentation_node
    assert seg.GetName() == "T1 phantom SynthSeg"
    # progress was streamed and went up to 100 %
    assert stages[-1] == (1.0, "done") and any(s == "network" for _, s in stages)
    fractions = [f for f, _ in stages]
    assert fractions == sorted(fractions)

    # segments: names, colours, label values, terminology
    segmentation = seg.GetSegmentation()
    present = {}
    for i in range(segmentation.GetNumberOfSegments()):
        s = segmentation.GetNthSegment(i)
        st = label_table.structure(s.GetLabelValue())
        assert s.GetName() == st.freesurfer_name
        np.testing.assert_allclose(s.GetColor(), np.array(st.color) / 255, atol=1e-6)
        assert s.GetTerminology() == terminology_entry(st.label)
        present[s.GetLabelValue()] = s
    assert set(present) == {2, 24, 41}

    # geometry: the segmentation overlays the phantom in physical space
    expected = expected_labels(intensity)
    masks = segment_masks_on_grid(seg, shape, m)
    for label in (2, 24, 41):
        assert dice(masks[label], expected == label) > 0.85, (case, label)
    ras = voxel_centres_ras(shape, m)
    assert ras[masks[2]][:, 0].mean() < centre[0] - 3  # left WM on the patient's left
    assert ras[masks[41]][:, 0].mean() > centre[0] + 3
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()) is volume

    # table: one row per structure, volumes consistent with the segmentation
    table = result.table_node
    rows = statistics_table.table_rows(table)
    assert [r["Label"] for r in rows] == sorted(lab for lab in PHANTOM_LEVELS if lab)
    voxel_mm3 = abs(np.linalg.det(m[:3, :3]))
    tiv = float(table.GetAttribute(statistics_table.TIV_ATTRIBUTE))
    for r in rows:
        hard = masks[r["Label"]].sum() * voxel_mm3
        # soft volumes come from SynthSeg's 1 mm grid: partial volume weighs more at 5 mm
        assert r["Volume [mm3]"] == pytest.approx(hard, rel=0.35 if case == "thick-slices" else 0.15), (case, r)
        assert r["Volume [mL]"] == pytest.approx(r["Volume [mm3]"] / 1000)
        assert r["% of TIV"] == pytest.approx(100 * r["Volume [mm3]"] / tiv)
    assert tiv == pytest.approx(sum(r["Volume [mm3]"] for r in rows), rel=0.05)

    # placed in the input's study; no temporary node or file left
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study
    assert sh.GetItemParent(sh.GetItemByDataNode(table)) == study
    assert not slicer.util.getNodesByClass("vtkMRMLLabelMapVolumeNode")
    assert list(work.iterdir()) == []


def test_table_volumes_equal_what_the_engine_computes(scene, tiny_model, tmp_path):
    shape, spacing, axes = CASES["oblique"]
    m = centred_affine(shape, spacing, axes)
    intensity = phantom(shape, m)
    volume = add_volume(scene, intensity, m, "T1")
    job = SegmentationJob(scene, volume, SegmentOptions(model=str(tiny_model), device="cpu"),
                          temp_root=tmp_path)
    job.start()
    result = job.wait(timeout=300)
    # the engine run by hand on the same image
    from SynthSegMONAISlicerLib.volume_export import export_volume

    export_volume(volume, tmp_path / "in.nii.gz")
    env = dict(os.environ, PYTHONPATH=str(fx.MODULE_DIR))
    subprocess.run([sys.executable, "-m", "SynthSegMONAILib.cli", "segment", "--i", str(tmp_path / "in.nii.gz"),
                    "--o", str(tmp_path / "seg.nii.gz"), "--vol", str(tmp_path / "vol.csv"),
                    "--model", str(tiny_model), "--device", "cpu", "--output-grid", "input"],
                   check=True, env=env, capture_output=True)
    with open(tmp_path / "vol.csv", newline="") as f:
        header, values = list(csv.reader(f))[:2]
    engine = dict(zip(header, values, strict=True))
    for r in statistics_table.table_rows(result.table_node):
        assert r["Volume [mm3]"] == pytest.approx(float(engine[r["SynthSeg name"]]), rel=1e-5)
    assert float(result.table_node.GetAttribute(statistics_table.TIV_ATTRIBUTE)) == pytest.approx(
        float(engine["total intracranial"]), rel=1e-5)


def test_output_on_synthseg_grid_and_existing_nodes_refilled(scene, tiny_model, tmp_path):
    shape, spacing, axes = CASES["thick-slices"]
    m = centred_affine(shape, spacing, axes)
    intensity = phantom(shape, m)
    volume = add_volume(scene, intensity, m, "T1")
    seg0 = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    table0 = scene.AddNewNodeByClass("vtkMRMLTableNode", "my table")
    job = SegmentationJob(scene, volume, SegmentOptions(model=str(tiny_model), device="cpu",
                                                        output_grid="synthseg", fast=True),
                          segmentation_node=seg0, table_node=table0, temp_root=tmp_path)
    job.start()
    result = job.wait(timeout=300)
    assert result.segmentation_node is seg0 and result.table_node is table0
    masks = segment_masks_on_grid(seg0, shape, m)
    expected = expected_labels(intensity)
    assert dice(masks[2], expected == 2) > 0.8 and dice(masks[41], expected == 41) > 0.8
    assert len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")) == 1


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process check")
def test_cancel_kills_the_engine_and_leaves_no_trace(scene, tiny_model, tmp_path):
    shape = (64, 64, 64)
    m = centred_affine(shape, (1.0, 1.0, 1.0))
    volume = add_volume(scene, phantom(shape, m), m, "T1")
    before = scene_node_ids(scene)
    work = tmp_path / "work"
    work.mkdir()
    stages = []
    job = SegmentationJob(scene, volume, SegmentOptions(model=str(tiny_model), device="cpu"),
                          temp_root=work, on_progress=lambda f, s: stages.append(s))
    job.start()
    deadline = time.monotonic() + 60
    while not any(s not in ("starting",) for s in stages) and time.monotonic() < deadline:
        job.poll(0.1)
    assert job.state is JobState.SEGMENTING, job.error
    pid = job.pid
    job.cancel(wait=True)
    assert job.state is JobState.CANCELLED
    assert fx.process_gone(pid)
    assert scene_node_ids(scene) == before
    assert list(work.iterdir()) == []
    with pytest.raises(SegmentationError, match="cancelled"):
        job.wait(1)


def test_engine_failure_is_reported_and_scene_unchanged(scene, tiny_model, tmp_path):
    fake = tmp_path / "fake_python"
    fake.write_text("#!/bin/sh\n"
                    "echo 'SYNTHSEG_PROGRESS {\"stage\": \"loading\", \"fraction\": 0.1}'\n"
                    "echo 'SYNTHSEG_ERROR {\"input\": \"x\", \"message\": \"image is empty\"}'\n"
                    "echo 'error: image is empty' >&2\nexit 2\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    volume = add_volume(scene, np.ones((8, 8, 8), np.float32), np.eye(4), "T1")
    before = scene_node_ids(scene)
    work = tmp_path / "work"
    work.mkdir()
    job = SegmentationJob(scene, volume, SegmentOptions(model=str(tiny_model)), temp_root=work,
                          python=str(fake))
    job.start()
    with pytest.raises(SegmentationError, match="image is empty"):
        job.wait(30)
    assert job.state is JobState.FAILED
    assert scene_node_ids(scene) == before
    assert list(work.iterdir()) == []
