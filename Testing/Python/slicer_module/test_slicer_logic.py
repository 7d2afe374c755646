"""Qt-free logic of the Slicer module against a real MRML scene (slicer-core)."""

from __future__ import annotations

import json
import sys
import textwrap
import time

import numpy as np
import pytest
import slicer
import slicer_fixtures as fx
import vtk
from slicer_fixtures import add_volume, affine, rotation, scene_node_ids

from SynthSegMONAILib import labels as label_table
from SynthSegMONAISlicerLib import dependencies, models, parameters, statistics_table
from SynthSegMONAISlicerLib.errors import SegmentationError
from SynthSegMONAISlicerLib.options import SegmentOptions
from SynthSegMONAISlicerLib.process_runner import (
    ErrorEvent,
    FinishedEvent,
    LogEvent,
    ProcessRunner,
    ProgressEvent,
    ResultEvent,
    parse_line,
)
from SynthSegMONAISlicerLib.segment_job import SegmentationJob
from SynthSegMONAISlicerLib.segmentation_import import (
    import_labelmap,
    place_in_subject_hierarchy,
    terminology_entry,
)
from SynthSegMONAISlicerLib.volume_export import InputVolumeError, check_input_volume, export_volume

# fixtures shared with the other Slicer test modules
scene, model_home, tiny_model = fx.scene, fx.model_home, fx.tiny_model


# --- process runner ------------------------------------------------------------------------
def test_parse_progress_error_and_log_lines():
    e = parse_line('SYNTHSEG_PROGRESS {"image": 1, "images": 2, "stage": "network", "fraction": 0.42}\n')
    assert e == ProgressEvent("network", 0.42, 1, 2)
    e = parse_line('SYNTHSEG_ERROR {"input": "a.nii", "message": "not 3D"}')
    assert e == ErrorEvent("not 3D", "a.nii")
    assert parse_line("error: file not found", "stderr") == ErrorEvent("file not found")
    assert parse_line("SYNTHSEG_PROGRESS {broken") == LogEvent("SYNTHSEG_PROGRESS {broken")
    assert parse_line("loading model") == LogEvent("loading model")
    assert parse_line('SYNTHSEG_PROGRESS {"fraction": 7}').fraction == 1.0
    e = parse_line('SYNTHSEG_RESULT {"input": "in.nii.gz", "segmentation": "seg.nii.gz", "labels": [2, 41], '
                   '"volumes_mm3": [10.5, 20.25], "total_intracranial_mm3": null}')
    assert isinstance(e, ResultEvent) and e.result.labels == [2, 41] and e.result.volumes_mm3 == [10.5, 20.25]
    assert e.result.segmentation == "seg.nii.gz" and e.result.total_intracranial_mm3 is None
    damaged = 'SYNTHSEG_RESULT {"input": "in.nii.gz", "segmentation": "s", "labels": [2], "volumes_mm3": []}'
    assert parse_line(damaged) == LogEvent(damaged)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")
def test_cancel_kills_the_whole_process_tree(tmp_path):
    script = tmp_path / "tree.py"
    script.write_text(textwrap.dedent("""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print("CHILD", child.pid, flush=True)
        print('SYNTHSEG_PROGRESS {"stage": "network", "fraction": 0.5}', flush=True)
        time.sleep(60)
    """))
    runner = ProcessRunner([sys.executable, str(script)])
    runner.start()
    events, deadline = [], time.monotonic() + 20
    while not any(isinstance(e, ProgressEvent) for e in events) and time.monotonic() < deadline:
        events += runner.poll(0.2)
    child_pid = int(next(e.text.split()[1] for e in events if isinstance(e, LogEvent)
                         and e.text.startswith("CHILD")))
    assert not fx.process_gone(child_pid)
    t0 = time.monotonic()
    runner.cancel()
    assert time.monotonic() - t0 < 0.5  # returns at once; the tree is stopped in the background
    finished = []
    deadline = time.monotonic() + 15
    while not finished and time.monotonic() < deadline:
        finished = [e for e in runner.poll(0.2) if isinstance(e, FinishedEvent)]
    assert finished and finished[0].cancelled
    # the final event comes only once the whole tree is gone
    assert fx.process_gone(runner.pid) and fx.process_gone(child_pid)
    assert not runner.running and not runner.cancelling


def test_runner_reports_exit_status_and_stderr_error():
    runner = ProcessRunner([sys.executable, "-c",
                            "import sys; print('hello'); print('error: bad input', file=sys.stderr); sys.exit(3)"])
    runner.start()
    events = []
    while runner.running:
        events += runner.poll(0.2)
    assert LogEvent("hello") in events
    assert ErrorEvent("bad input") in events
    assert FinishedEvent(3, False) in events


# --- volume export -------------------------------------------------------------------------
GEOMETRIES = {
    "RAS": affine((1, 1, 1), origin=(-10, 5, 3)),
    "LPS": affine((1.0, 1.2, 0.9), axes=np.diag([-1, -1, 1]), origin=(20, 10, -4)),
    "oblique": affine((1.1, 0.9, 1.3), axes=rotation("z", 25) @ rotation("x", -15), origin=(3, -7, 11)),
    "left-handed": affine((1, 1, 1), axes=np.diag([-1, 1, 1]), origin=(12, -3, 0)),
    "thick": affine((0.9, 0.9, 5.0), axes=rotation("y", 10), origin=(0, 0, -30)),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_export_keeps_voxels_and_geometry_exactly(scene, tmp_path, name):
    import nibabel as nib

    m = GEOMETRIES[name]
    data = np.random.default_rng(0).integers(0, 1000, size=(7, 6, 5)).astype(np.int16)
    volume = add_volume(scene, data, m, name)
    written = export_volume(volume, tmp_path / "v.nii.gz")
    img = nib.load(tmp_path / "v.nii.gz")
    np.testing.assert_allclose(img.affine, m, atol=1e-6)
    np.testing.assert_allclose(written, m, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)


def test_export_applies_parent_linear_transform(scene, tmp_path):
    import nibabel as nib

    m = affine((1, 1, 2))
    volume = add_volume(scene, np.ones((4, 4, 4), np.float32), m)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = (5, -2, 1)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    export_volume(volume, tmp_path / "v.nii.gz")
    np.testing.assert_allclose(nib.load(tmp_path / "v.nii.gz").affine, shift @ m, atol=1e-6)


def test_bad_inputs_are_refused_with_clear_messages(scene):
    with pytest.raises(InputVolumeError, match="No input volume"):
        check_input_volume(None)
    flat = add_volume(scene, np.zeros((16, 16, 1), np.int16), np.eye(4), "flat")
    with pytest.raises(InputVolumeError, match="2D"):
        check_input_volume(flat)
    rgb = add_volume(scene, np.zeros((8, 8, 8, 3), np.uint8), np.eye(4), "photo",
                     "vtkMRMLVectorVolumeNode")
    with pytest.raises(InputVolumeError, match="components|scalar"):
        check_input_volume(rgb)
    lm = add_volume(scene, np.zeros((8, 8, 8), np.int16), np.eye(4), "labels", "vtkMRMLLabelMapVolumeNode")
    with pytest.raises(InputVolumeError, match="not a scalar volume"):
        check_input_volume(lm)


@pytest.mark.parametrize("case", ["none", "2d", "rgb"])
def test_job_refuses_bad_input_and_leaves_scene_unchanged(scene, tmp_path, tiny_model, case):
    volume = {"none": lambda: None,
              "2d": lambda: add_volume(scene, np.zeros((16, 16, 1), np.int16), np.eye(4), "flat"),
              "rgb": lambda: add_volume(scene, np.zeros((8, 8, 8, 3), np.uint8), np.eye(4), "rgb",
                                        "vtkMRMLVectorVolumeNode")}[case]()
    before = scene_node_ids(scene)
    job = SegmentationJob(scene, volume, SegmentOptions(model=str(tiny_model)), temp_root=tmp_path)
    with pytest.raises(SegmentationError, match={"none": "No input volume", "2d": "2D",
                                                 "rgb": "components"}[case]):
        job.start()
    assert job.error and job.state.value == "failed"
    assert scene_node_ids(scene) == before
    assert list(tmp_path.iterdir()) == []


def test_job_refuses_a_file_that_is_not_a_model(scene, tmp_path):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("this is not a model")
    volume = add_volume(scene, np.ones((8, 8, 8), np.int16), np.eye(4))
    before = scene_node_ids(scene)
    work = tmp_path / "work"
    work.mkdir()
    job = SegmentationJob(scene, volume, SegmentOptions(model=str(bad)), temp_root=work)
    with pytest.raises(SegmentationError, match="not a SynthSeg-MONAI model"):
        job.start()
    assert scene_node_ids(scene) == before
    assert list(work.iterdir()) == []


# --- segmentation import -------------------------------------------------------------------
def test_terminology_entries():
    assert terminology_entry(17) == (
        "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure"
        "~SCT^5366008^Hippocampus~SCT^7771000^Left~Anatomic codes - DICOM master list~^^~^^")
    assert "~SCT^24028007^Right~" in terminology_entry(53)
    assert "~SCT^65216001^Cerebrospinal fluid~^^~" in terminology_entry(24)
    assert terminology_entry(8).startswith(
        "Segmentation category and type - SynthSegMONAI~SCT^123037004^Anatomical Structure~99SYNTHSEG^2^")
    every = [s.label for s in label_table.all_structures() if s.label]
    assert all(terminology_entry(lab) for lab in every)


def test_custom_terminology_file_declares_every_private_code():
    from SynthSegMONAISlicerLib.parcellation import REGIONS
    from SynthSegMONAISlicerLib.segmentation_import import CUSTOM_CODES, CUSTOM_CONTEXT, CUSTOM_SCHEME

    doc = json.loads((models_dir() / "Resources" / "SynthSegMONAI.term.json").read_text())
    assert doc["SegmentationCategoryTypeContextName"] == CUSTOM_CONTEXT
    types = doc["SegmentationCodes"]["Category"][0]["Type"]
    declared = {(t["CodingSchemeDesignator"], t["CodeValue"], t["CodeMeaning"]) for t in types}
    # the label table's structures without a master list code, and the cortical parcels' regions
    assert declared == {(CUSTOM_SCHEME, v, k) for k, v in CUSTOM_CODES.items()} | \
        {(CUSTOM_SCHEME, r.code, r.code_meaning) for r in REGIONS}
    missing = {s.snomed_meaning for s in label_table.all_structures() if s.label and not s.snomed_code}
    assert missing == set(CUSTOM_CODES)


def models_dir():
    from slicer_fixtures import MODULE_DIR

    return MODULE_DIR


def _world_label_at(seg_node, segment_id, ras):
    """1 if the segment covers RAS point ``ras`` (from its own oriented labelmap)."""
    lm = slicer.vtkOrientedImageData()
    seg_node.GetBinaryLabelmapRepresentation(segment_id, lm)
    m = vtk.vtkMatrix4x4()
    lm.GetImageToWorldMatrix(m)
    inv = np.linalg.inv(slicer.util.arrayFromVTKMatrix(m))
    ijk = np.rint(inv @ np.append(ras, 1.0))[:3].astype(int)
    ext = lm.GetExtent()
    if not all(ext[2 * a] <= ijk[a] <= ext[2 * a + 1] for a in range(3)):
        return 0
    return int(lm.GetScalarComponentAsDouble(*ijk, 0))


@pytest.mark.parametrize("name", ["RAS", "left-handed", "oblique"])
def test_import_labelmap_names_colours_values_terminology_geometry(scene, name):
    m = GEOMETRIES[name]
    labels = np.zeros((10, 9, 8), np.int16)
    labels[1:4, 2:5, 1:3] = 17
    labels[6:9, 2:5, 4:7] = 53
    labels[4:6, 6:8, 2:6] = 24
    volume = add_volume(scene, labels.astype(np.float32), m, "T1")
    seg = import_labelmap(scene, labels, m, "T1 SynthSeg", reference_volume=volume)
    segmentation = seg.GetSegmentation()
    by_label = {segmentation.GetNthSegment(i).GetLabelValue(): segmentation.GetNthSegmentID(i)
                for i in range(segmentation.GetNumberOfSegments())}
    assert sorted(by_label) == [17, 24, 53]
    for label, sid in by_label.items():
        s = segmentation.GetSegment(sid)
        st = label_table.structure(label)
        assert s.GetName() == st.freesurfer_name
        np.testing.assert_allclose(s.GetColor(), np.array(st.color) / 255.0, atol=1e-6)
        assert s.GetTerminology() == terminology_entry(label)
    # every voxel centre of the input maps to the right segment in physical space
    for ijk in [(2, 3, 1), (7, 3, 5), (4, 6, 3), (0, 0, 0)]:
        ras = (m @ np.append(ijk, 1.0))[:3]
        expected = labels[ijk]
        got = {lab for lab, sid in by_label.items() if _world_label_at(seg, sid, ras)}
        assert got == ({int(expected)} if expected else set())
    # only the segmentation (and its display node) were added: temporary nodes are gone
    assert not slicer.util.getNodesByClass("vtkMRMLLabelMapVolumeNode")
    assert not [n for n in slicer.util.getNodesByClass("vtkMRMLColorTableNode") if "temporary" in n.GetName()]
    ref = seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole())
    assert ref is volume


def test_import_labelmap_with_the_labels_the_engine_reported_names_every_segment(scene):
    labels = np.zeros((10, 9, 8), np.int16)
    labels[1:4, 2:5, 1:3] = 17
    labels[6:9, 2:5, 4:7] = 53
    seg = import_labelmap(scene, labels, np.eye(4), "T1 SynthSeg", present_labels=[53, 17])
    segmentation = seg.GetSegmentation()
    found = {segmentation.GetNthSegment(i).GetLabelValue(): segmentation.GetNthSegment(i).GetName()
             for i in range(segmentation.GetNumberOfSegments())}
    assert found == {17: "Left-Hippocampus", 53: "Right-Hippocampus"}


def test_segmentation_placed_in_the_input_study(scene):
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient")
    study = sh.CreateStudyItem(patient, "Study")
    volume = add_volume(scene, np.ones((4, 4, 4), np.float32), np.eye(4))
    sh.CreateItem(study, volume)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    place_in_subject_hierarchy(scene, seg, volume)
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study


# --- statistics table ----------------------------------------------------------------------
def test_volume_table_with_tiv_and_csv_export(scene, tmp_path):
    report = statistics_table.volume_report([0, 2, 24, 41], [1000.0, 500.0, 1500.0], 3000.0)
    assert [s.synthseg_name for s in report.structures] == label_table.csv_names([2, 24, 41])
    table = statistics_table.fill_table(scene, report, "T1 SynthSeg volumes")
    rows = statistics_table.table_rows(table)
    assert [r["Label"] for r in rows] == [2, 24, 41]
    assert [r["Structure"] for r in rows] == ["Left-Cerebral-White-Matter", "CSF", "Right-Cerebral-White-Matter"]
    assert [r["Volume [mm3]"] for r in rows] == [1000.0, 500.0, 1500.0]
    assert [r["Volume [mL]"] for r in rows] == [1.0, 0.5, 1.5]
    assert rows[0]["% of TIV"] == pytest.approx(100 / 3)
    assert table.GetColumnUnitLabel("Volume [mL]") == "mL"
    statistics_table.export_csv(table, tmp_path / "out.csv")
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert lines[0] == "Label,Structure,SynthSeg name,Volume [mm3],Volume [mL],% of TIV"
    assert lines[-1].startswith(",Total intracranial,total intracranial,3000,3,100")


def test_volume_table_without_csf_has_no_tiv_column(scene, tmp_path):
    report = statistics_table.volume_report([0, 2, 41], [10.0, 20.0], None)
    assert report.total_intracranial_mm3 is None
    table = statistics_table.fill_table(scene, report, "t")
    assert "% of TIV" not in statistics_table.table_rows(table)[0]


def test_volumes_mismatching_the_model_are_refused():
    with pytest.raises(ValueError, match="2 volumes for a model with 3 structures"):
        statistics_table.volume_report([0, 2, 24, 41], [10.0, 20.0], None)


# --- parameters, dependencies, models ------------------------------------------------------
def test_parameters_round_trip(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    parameters.set_defaults(node)
    assert parameters.load_options(node) == SegmentOptions()
    opts = SegmentOptions(model="synthseg_2.0", fast=True, device="cpu", threads=3, output_grid="synthseg")
    parameters.save_options(node, opts)
    assert parameters.load_options(node) == opts
    node.SetParameter("Device", "tpu")
    assert parameters.load_options(node).device == "auto"


def test_requirements_file_matches_the_engine_dependencies():
    import tomllib
    from slicer_fixtures import REPO

    reqs = dependencies.read_requirements(dependencies.requirements_file(REPO / "SynthSegMONAI"))
    assert all(">=" in r and "==" not in r for r in reqs)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    engine = {dependencies.distribution_name(r).lower() for r in project} - {"torch"}
    assert {dependencies.distribution_name(r).lower() for r in reqs} == engine
    assert dependencies.missing_requirements(reqs) == []


def test_missing_pytorch_extension_gives_a_clear_message(monkeypatch):
    monkeypatch.setattr(dependencies, "is_satisfied", lambda r: False)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)
    with pytest.raises(dependencies.DependencyError, match="Extensions Manager"):
        dependencies.ensure_torch(lambda text: True)


def test_add_model_file(model_home, tiny_model, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\0" * 64)
    with pytest.raises(SegmentationError, match="not a SynthSeg-MONAI model"):
        models.add_model_file(bad)
    assert not (model_home / "models" / "bad.safetensors").exists()
    name = models.add_model_file(tiny_model)
    assert (name, model_home / "models" / "tiny.safetensors") in models.list_models()
    with pytest.raises(SegmentationError, match="already exists"):
        models.add_model_file(_copy(tiny_model, tmp_path / "other" / "tiny.safetensors"))
    assert "structures" in models.model_summary(tiny_model)


def _copy(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    return dst
