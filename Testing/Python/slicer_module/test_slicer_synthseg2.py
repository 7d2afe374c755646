"""SynthSeg 2.0's options in the Slicer module: --parc, --robust, --ct, --qc.

Options become the engine's flags; a result with cortical parcels becomes named, coloured,
coded segments and a volume table listing the parcels; QC scores become a table. The engine is
stood in for by a fake interpreter that records its command line and prints a hand-made
``SYNTHSEG_RESULT`` line naming a hand-made label map (the scene, nodes and terminology logic
are real: slicer-core). Names, colours and codes are checked against the engine's constants,
FreeSurfer's colour table and Slicer's terminology files (extracts in ``Testing/Data``).
"""

from __future__ import annotations

import json
import re
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import slicer
import slicer_fixtures as fx
from conftest import SHARED
from slicer_fixtures import REPO, add_volume, scene_node_ids

from SynthSegMONAILib import ResultLine
from SynthSegMONAILib import labels as label_table
from SynthSegMONAILib.protocol import RESULT_PREFIX, format_line
from SynthSegMONAISlicerLib import parameters, parcellation, qc_table, statistics_table
from SynthSegMONAISlicerLib.errors import SegmentationError
from SynthSegMONAISlicerLib.job_state import JobState
from SynthSegMONAISlicerLib.options import SegmentOptions
from SynthSegMONAISlicerLib.segment_job import SegmentationJob
from SynthSegMONAISlicerLib.segmentation_import import (
    ANATOMIC_CONTEXT,
    CEREBRAL_CORTEX_REGION,
    CUSTOM_CONTEXT,
    LATERALITY_CODES,
    import_labelmap,
    terminology_entry,
)

scene, tiny_model, model_home, module = fx.scene, fx.tiny_model, fx.model_home, fx.module

DATA = REPO / "Testing" / "Data"
REGION_EXTRACT = DATA / "terminology" / "AnatomicRegionAndModifier-DICOM-Master-brain-extract.json"
CUSTOM_FILE = fx.MODULE_DIR / "Resources" / "SynthSegMONAI.term.json"
SHARED_ARRAYS = SHARED / "reference" / "synthseg_label_arrays.json"

# A --parc result: subcortical structures, CSF, parcels of both hemispheres (no 3/42 voxels left)
SEG_LABELS = (2, 17, 24, 41, 53)
PARC_BLOCKS = (1001, 1035, 1022, 2001, 2022, 2035)
QC = {"general white matter": 0.9312, "general grey matter": 0.8825, "general csf": 0.9011,
      "cerebellum": 0.8702, "brainstem": 0.9433, "thalamus": 0.8124, "putamen+pallidum": 0.6650,
      "hippocampus+amygdala": 0.7521}


# --- the tables: parcels and QC groups against the engine and the references --------------
def test_parcels_are_the_engines_parcellation_labels_and_names():
    from SynthSegMONAILib import synthseg2_networks as nets

    assert (0, *parcellation.PARCEL_LABELS) == tuple(nets.PARCELLATION_LABELS)
    assert ("Background", *(p.name for p in parcellation.PARCELS)) == tuple(nets.PARCELLATION_NAMES)
    assert parcellation.CORTEX_LABELS == tuple(nets.CORTEX_LABELS)
    assert len(parcellation.PARCELS) == 68 and not set(parcellation.PARCEL_LABELS) & {
        s.label for s in label_table.all_structures()}


def test_parcels_match_synthsegs_own_arrays():
    if not SHARED_ARRAYS.is_file():
        pytest.skip(f"{SHARED_ARRAYS} not available")
    arrays = json.loads(SHARED_ARRAYS.read_text())
    # the original lists each parcel once per hemisphere; sorted and unique as the engine reads it
    pairs = sorted(set(zip(arrays["synthseg_parcellation_labels"], arrays["synthseg_parcellation_names"],
                           strict=True)))
    assert [(p.label, p.name) for p in parcellation.PARCELS] == [(lab, n) for lab, n in pairs if lab]


def test_parcel_names_colours_and_sides_follow_freesurfer():
    """FreeSurfer names parcels ctx-lh-*/ctx-rh-* and gives a region the same colour on both
    sides; every region has its own colour."""
    by_label = {p.label: p for p in parcellation.PARCELS}
    for p in parcellation.PARCELS:
        side = "lh" if p.label < 2000 else "rh"
        assert p.name.startswith(f"ctx-{side}-"), p.name
        assert p.laterality == ("Left" if side == "lh" else "Right")
        assert all(0 <= c <= 255 for c in p.color)
        if side == "lh":
            twin = by_label[p.label + 1000]
            assert twin.name == p.name.replace("ctx-lh-", "ctx-rh-")
            assert twin.color == p.color, p.name
    left = [p.color for p in parcellation.PARCELS if p.label < 2000]
    assert len(set(left)) == len(left)


def test_qc_groups_are_the_engines():
    from SynthSegMONAILib import synthseg2_networks as nets

    assert qc_table.QC_GROUP_NAMES == tuple(nets.QC_NAMES[1:])


# --- options -> command line ---------------------------------------------------------------
def _job_command(scene, options: SegmentOptions, tmp_path: Path) -> list[str]:
    volume = add_volume(scene, np.ones((4, 4, 4), np.float32), np.eye(4), "T1")
    job = SegmentationJob(scene, volume, options, temp_root=tmp_path)
    job.temp_dir = tmp_path / "work"
    if not job._engine_picks_model():
        job._model_path = Path(options.model)
    return job.command(job.temp_dir / "input.nii.gz")


@pytest.mark.parametrize("option, flags", [
    ({}, []),
    ({"parc": True}, ["--parc"]),
    ({"robust": True}, ["--robust"]),
    ({"ct": True}, ["--ct"]),
    ({"qc": True}, ["--qc", "<work>/qc.csv"]),
    ({"parc": True, "robust": True, "ct": True, "qc": True, "fast": True},
     ["--fast", "--parc", "--robust", "--ct", "--qc", "<work>/qc.csv"]),
])
def test_options_become_engine_flags(scene, tmp_path, option, flags):
    cmd = _job_command(scene, SegmentOptions(model="/models/m.safetensors", **option), tmp_path)
    work = str(tmp_path / "work")
    tail = cmd[cmd.index("--progress-lines") + 1:]
    assert tail == [f.replace("<work>", work) for f in flags]
    assert cmd[cmd.index("--model") + 1] == "/models/m.safetensors"


def test_robust_with_the_default_model_lets_the_engine_pick_it(scene, tmp_path):
    cmd = _job_command(scene, SegmentOptions(robust=True), tmp_path)
    assert "--robust" in cmd and "--model" not in cmd
    # a model the user chose is passed as it is
    cmd = _job_command(scene, SegmentOptions(model="/m/robust.safetensors", robust=True), tmp_path)
    assert cmd[cmd.index("--model") + 1] == "/m/robust.safetensors" and "--robust" in cmd


def test_parameter_node_round_trip(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    parameters.set_defaults(node)
    assert parameters.load_options(node) == SegmentOptions()
    assert {node.GetParameter(n) for n in parameters.FLAGS} == {"false"}
    opts = SegmentOptions(model="synthseg_2.0", fast=True, device="cpu", threads=2, output_grid="synthseg",
                          parc=True, robust=True, ct=True, qc=True)
    parameters.save_options(node, opts)
    assert parameters.load_options(node) == opts
    for field in ("parc", "robust", "ct", "qc"):
        one = SegmentOptions(**{field: True})
        parameters.save_options(node, one)
        assert parameters.load_options(node) == one
    node.SetParameter("QualityControl", "")  # missing: default
    assert parameters.load_options(node).qc is False
    table = scene.AddNewNodeByClass("vtkMRMLTableNode")
    node.SetNodeReferenceID(parameters.OUTPUT_QC_TABLE, table.GetID())
    assert node.GetNodeReference(parameters.OUTPUT_QC_TABLE) is table


# --- result line ---------------------------------------------------------------------------
def test_result_line_carries_qc_scores():
    line = ResultLine(input="a.nii.gz", segmentation="s.nii.gz", labels=[2, 1001], volumes_mm3=[1.0, 2.0], qc=QC)
    back = ResultLine.from_payload(json.loads(format_line(RESULT_PREFIX, line.payload()).split(" ", 1)[1]))
    assert back == line and back.qc == QC
    assert ResultLine.from_payload({"input": "a", "segmentation": "s"}).qc is None
    with pytest.raises(ValueError, match="malformed"):
        ResultLine.from_payload({"input": "a", "segmentation": "s", "qc": {"thalamus": "high"}})


# --- parcels in the segmentation -----------------------------------------------------------
def _blocks(labels: tuple[int, ...], shape=(24, 8, 6)) -> np.ndarray:
    out = np.zeros(shape, np.int16)
    edges = np.linspace(0, shape[0], len(labels) + 1).astype(int)
    for label, a, b in zip(labels, edges[:-1], edges[1:], strict=True):
        out[a:b, 2:6, 1:5] = label
    return out


def _segments(seg_node) -> dict[int, object]:
    segmentation = seg_node.GetSegmentation()
    return {segmentation.GetNthSegment(i).GetLabelValue(): segmentation.GetNthSegment(i)
            for i in range(segmentation.GetNumberOfSegments())}


def test_parcels_become_named_coloured_coded_segments(scene):
    m = fx.centred_affine((24, 8, 6), (1.0, 1.2, 1.5))
    labels = _blocks(SEG_LABELS + PARC_BLOCKS)
    volume = add_volume(scene, labels.astype(np.float32), m, "T1")
    seg = import_labelmap(scene, labels, m, "T1 SynthSeg", reference_volume=volume)
    found = _segments(seg)
    assert sorted(found) == sorted(SEG_LABELS + PARC_BLOCKS)
    for label in PARC_BLOCKS:
        s = found[label]
        assert s.GetName() == parcellation.parcel(label).name  # ctx-lh-* / ctx-rh-*, as SynthSeg names them
        np.testing.assert_allclose(s.GetColor(), np.array(parcellation.parcel(label).color) / 255.0, atol=1e-6)
        entry = s.GetTerminology()
        assert entry == terminology_entry(label)
        fields = entry.split("~")
        side = LATERALITY_CODES["Left" if label < 2000 else "Right"]
        assert fields[0] == CUSTOM_CONTEXT and fields[3] == side
        assert fields[4:] == [ANATOMIC_CONTEXT, CEREBRAL_CORTEX_REGION, side]
        assert fields[2].split("^")[2] == parcellation.parcel(label).region.code_meaning
    assert found[17].GetName() == "Left-Hippocampus"  # the label table's structures as before
    assert found[1001].GetTerminology().split("~")[2] == found[2001].GetTerminology().split("~")[2]


def test_parcel_segments_survive_a_save_and_reload(scene, tmp_path):
    labels = _blocks((1001, 2035))
    seg = import_labelmap(scene, labels, np.eye(4), "T1 SynthSeg")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "parc.seg.nrrd"))
    assert storage.WriteData(seg)
    again = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert storage.ReadData(again)
    found = {s.GetName(): (s.GetLabelValue(), s.GetTerminology()) for s in _segments(again).values()}
    assert found == {"ctx-lh-bankssts": (1001, terminology_entry(1001)),
                     "ctx-rh-insula": (2035, terminology_entry(2035))}


@pytest.fixture(scope="module")
def terminology():
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    assert logic.LoadTerminologyFromFile(str(CUSTOM_FILE)) == CUSTOM_CONTEXT
    assert logic.LoadRegionContextFromFile(str(REGION_EXTRACT)) == ANATOMIC_CONTEXT
    return logic


def _codes(items) -> set[str]:
    return {f"{t.GetCodingSchemeDesignator()}^{t.GetCodeValue()}" for t in items}


@pytest.mark.parametrize("parcel", parcellation.PARCELS, ids=lambda p: p.name)
def test_parcel_entries_exist_in_the_module_and_region_terminologies(terminology, parcel):
    logic = terminology
    entry = slicer.vtkSlicerTerminologyEntry()
    assert logic.DeserializeTerminologyEntry(terminology_entry(parcel.label), entry)
    # the type: found by Slicer in the module's context, with the meaning given there
    type_ = entry.GetTypeObject()
    type_.SetCodeMeaning("")
    assert logic.UpdateEntryFromLoadedTerminologies(entry, [CUSTOM_CONTEXT], [ANATOMIC_CONTEXT])
    assert type_.GetCodeValue() == parcel.region.code
    assert type_.GetCodeMeaning() == parcel.region.code_meaning
    assert tuple(type_.GetRecommendedDisplayRGBValue()) == parcel.color
    category = entry.GetCategoryObject()
    modifiers = []
    for i in range(logic.GetNumberOfTypeModifiersInTerminologyType(CUSTOM_CONTEXT, category, type_)):
        mod = slicer.vtkSlicerTerminologyType()
        logic.GetNthTypeModifierInTerminologyType(CUSTOM_CONTEXT, category, type_, i, mod)
        modifiers.append(mod)
    side = "^".join(LATERALITY_CODES[parcel.laterality].split("^")[:2])
    assert side in _codes(modifiers) and _codes([entry.GetTypeModifierObject()]) == {side}
    # the anatomic region: the cerebral cortex of the master list, on the parcel's side
    region = entry.GetRegionObject()
    regions = []
    for i in range(logic.GetNumberOfRegionsInRegionContext(ANATOMIC_CONTEXT)):
        r = slicer.vtkSlicerTerminologyType()
        logic.GetNthRegionInRegionContext(ANATOMIC_CONTEXT, i, r)
        regions.append(r)
    match = [r for r in regions if _codes([r]) == _codes([region]) and r.GetCodeMeaning() == region.GetCodeMeaning()]
    assert len(match) == 1 and region.GetCodeMeaning() == "Cerebral cortex"
    region_modifiers = []
    for i in range(logic.GetNumberOfRegionModifierInRegion(ANATOMIC_CONTEXT, match[0])):
        mod = slicer.vtkSlicerTerminologyType()
        logic.GetNthRegionModifierInRegion(ANATOMIC_CONTEXT, match[0], i, mod)
        region_modifiers.append(mod)
    assert _codes([entry.GetRegionModifierObject()]) == {side} and side in _codes(region_modifiers)


def test_module_terminology_file_lists_the_parcel_regions_as_the_code_does():
    doc = json.loads(CUSTOM_FILE.read_text())
    category = doc["SegmentationCodes"]["Category"][0]
    assert category["showAnatomy"] is True  # the parcels' anatomic region is shown in Slicer
    parcels = {t["CodeValue"]: t for t in category["Type"] if int(t["CodeValue"]) >= parcellation.CODE_OFFSET}
    assert sorted(parcels, key=int) == [r.code for r in parcellation.REGIONS]
    for r in parcellation.REGIONS:
        t = parcels[r.code]
        assert (t["CodingSchemeDesignator"], t["CodeMeaning"]) == ("99SYNTHSEG", r.code_meaning)
        assert tuple(t["recommendedDisplayRGBValue"]) == r.color and t["3dSlicerLabel"] == r.slicer_label
        assert {m["CodeMeaning"] for m in t["Modifier"]} == {"Left", "Right"}


# --- volume statistics with --parc ---------------------------------------------------------
def _parc_volumes() -> tuple[list[int], list[float]]:
    seg = [s.label for s in label_table.all_structures() if s.label]
    labels = [0, *seg, *parcellation.PARCEL_LABELS]
    return labels, [float(10 * i + 1) for i in range(len(labels) - 1)]


def test_volume_table_lists_the_parcels_by_name(scene):
    labels, volumes = _parc_volumes()
    report = statistics_table.volume_report(labels, volumes, 1.5e6)
    table = statistics_table.fill_table(scene, report, "T1 SynthSeg volumes")
    rows = {r["Label"]: r for r in statistics_table.table_rows(table)}
    assert len(rows) == len(labels) - 1
    for p in parcellation.PARCELS:
        assert rows[p.label]["Structure"] == p.name and rows[p.label]["SynthSeg name"] == p.name
    assert rows[3]["Structure"] == "Left-Cerebral-Cortex"  # whole cortex volumes stay, as in SynthSeg's CSV
    assert rows[1001]["Volume [mm3]"] == volumes[labels.index(1001) - 1]
    assert not any(r["Structure"].startswith("Label ") for r in rows.values())


# --- QC table ------------------------------------------------------------------------------
def test_qc_scores_become_a_table_in_synthsegs_group_order(scene):
    shuffled = dict(reversed(list(QC.items())))
    table = qc_table.fill_qc_table(scene, shuffled, "T1 SynthSeg QC")
    assert table.IsA("vtkMRMLTableNode") and table.GetName() == "T1 SynthSeg QC"
    assert qc_table.qc_rows(table) == [(g, pytest.approx(QC[g])) for g in qc_table.QC_GROUP_NAMES]
    t = table.GetTable()
    assert [t.GetColumnName(c) for c in range(t.GetNumberOfColumns())] == list(qc_table.COLUMNS)
    assert table.GetColumnDescription("Score")
    # refilled in place; an unknown group follows the known ones
    again = qc_table.fill_qc_table(scene, {"thalamus": 0.5, "new group": 0.25}, "x", table)
    assert again is table and qc_table.qc_rows(table) == [("thalamus", 0.5), ("new group", 0.25)]
    assert qc_table.lowest_score(QC) == ("putamen+pallidum", pytest.approx(0.665))
    assert qc_table.lowest_score({}) is None


def test_qc_csv_in_synthsegs_layout_is_read(tmp_path):
    path = tmp_path / "qc.csv"
    path.write_text("subject," + ",".join(QC) + "\ninput," + ",".join(f"{v:.4f}" for v in QC.values()) + "\n")
    assert qc_table.read_qc_csv(path) == pytest.approx(QC)
    path.write_text("nothing\n")
    with pytest.raises(ValueError, match="not a QC CSV"):
        qc_table.read_qc_csv(path)


# --- the job, with a fake engine -----------------------------------------------------------
def fake_engine(tmp_path: Path, labels: np.ndarray, affine: np.ndarray, result: dict,
                write_qc: dict | None = None, exit_code: int = 0) -> Path:
    """A stand-in for Slicer's Python running the engine: records its arguments, writes the
    label map (and the QC CSV if asked), prints one progress and one result line."""
    seg_path = tmp_path / "engine_seg.nii.gz"
    nib.save(nib.Nifti1Image(labels.astype(np.int16), affine), seg_path)
    payload = dict(result, input="in", segmentation=str(seg_path))
    script = tmp_path / "fake_python"
    script.write_text(f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
open({str(tmp_path / 'args.json')!r}, 'w').write(json.dumps(args))
qc = {write_qc!r}
if qc is not None and '--qc' in args:
    with open(args[args.index('--qc') + 1], 'w') as f:
        f.write('subject,' + ','.join(qc) + '\\n' + 'input,' + ','.join('%.4f' % v for v in qc.values()) + '\\n')
print('SYNTHSEG_PROGRESS ' + json.dumps({{"stage": "network", "fraction": 0.5}}), flush=True)
print({format_line(RESULT_PREFIX, payload)!r}, flush=True)
sys.exit({exit_code})
""")
    script.chmod(0o755)
    return script


def _parc_result(volume_labels: list[int], volumes: list[float], qc: dict | None) -> dict:
    return {"labels": volume_labels, "volumes_mm3": volumes, "total_intracranial_mm3": 1.5e6, "qc": qc}


@pytest.fixture
def input_volume(scene):
    m = fx.centred_affine((24, 8, 6), (1.0, 1.0, 1.0))
    volume = add_volume(scene, np.ones((24, 8, 6), np.float32), m, "T1")
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient"), "Study")
    sh.CreateItem(study, volume)
    return volume, m, study


def test_job_with_parc_and_qc_imports_parcels_volumes_and_scores(scene, tiny_model, tmp_path, input_volume):
    volume, m, study = input_volume
    labels, volumes = _parc_volumes()
    fake = fake_engine(tmp_path, _blocks(SEG_LABELS + PARC_BLOCKS), m, _parc_result(labels[1:], volumes, QC))
    work = tmp_path / "work"
    work.mkdir()
    job = SegmentationJob(scene, volume, SegmentOptions(model=str(tiny_model), parc=True, qc=True, ct=True),
                          temp_root=work, python=str(fake))
    job.start()
    result = job.wait(60)
    assert job.state is JobState.DONE
    args = json.loads((tmp_path / "args.json").read_text())
    assert {"--parc", "--ct", "--qc"} <= set(args) and "--robust" not in args
    assert Path(args[args.index("--qc") + 1]).parent.parent == work
    # parcels as segments
    found = _segments(result.segmentation_node)
    assert sorted(found) == sorted(SEG_LABELS + PARC_BLOCKS)
    assert {found[lab].GetName() for lab in PARC_BLOCKS} == {parcellation.parcel(lab).name for lab in PARC_BLOCKS}
    # volumes: every label of the result line, parcels by name
    rows = statistics_table.table_rows(result.table_node)
    assert [r["Label"] for r in rows] == labels[1:]
    assert rows[-1]["Structure"] == "ctx-rh-insula"
    # QC: a table next to the input, scores in group order
    qc = result.qc_table_node
    assert qc is job.qc_table_node and qc.GetName() == "T1 SynthSeg QC"
    assert [g for g, _ in qc_table.qc_rows(qc)] == list(qc_table.QC_GROUP_NAMES)
    assert dict(qc_table.qc_rows(qc)) == pytest.approx(QC) and result.qc_scores == QC
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert sh.GetItemParent(sh.GetItemByDataNode(qc)) == study
    assert qc.GetAttribute("SynthSegMONAI.Options") == "--parc --ct --qc"
    assert list(work.iterdir()) == []


def test_qc_scores_read_from_the_csv_when_the_result_line_has_none(scene, tiny_model, tmp_path, input_volume):
    volume, m, _ = input_volume
    fake = fake_engine(tmp_path, _blocks(SEG_LABELS), m,
                       _parc_result(list(SEG_LABELS), [1.0] * len(SEG_LABELS), None), write_qc=QC)
    existing = scene.AddNewNodeByClass("vtkMRMLTableNode", "my QC")
    job = SegmentationJob(scene, volume, SegmentOptions(model=str(tiny_model), qc=True), qc_table_node=existing,
                          temp_root=tmp_path, python=str(fake))
    job.start()
    result = job.wait(60)
    assert result.qc_table_node is existing
    assert dict(qc_table.qc_rows(existing)) == pytest.approx(QC)


def test_without_qc_no_qc_table_and_no_flag(scene, tiny_model, tmp_path, input_volume):
    volume, m, _ = input_volume
    fake = fake_engine(tmp_path, _blocks(SEG_LABELS), m,
                       _parc_result(list(SEG_LABELS), [1.0] * len(SEG_LABELS), None), write_qc=QC)
    job = SegmentationJob(scene, volume, SegmentOptions(model=str(tiny_model)), temp_root=tmp_path,
                          python=str(fake))
    job.start()
    result = job.wait(60)
    assert result.qc_table_node is None and result.qc_scores is None
    assert "--qc" not in json.loads((tmp_path / "args.json").read_text())
    assert len(slicer.util.getNodesByClass("vtkMRMLTableNode")) == 1


def test_qc_asked_but_not_reported_warns_and_imports_the_rest(scene, tiny_model, tmp_path, input_volume):
    volume, m, _ = input_volume
    fake = fake_engine(tmp_path, _blocks(SEG_LABELS), m,
                       _parc_result(list(SEG_LABELS), [1.0] * len(SEG_LABELS), None))
    job = SegmentationJob(scene, volume, SegmentOptions(model=str(tiny_model), qc=True), temp_root=tmp_path,
                          python=str(fake))
    job.start()
    result = job.wait(60)
    assert result.qc_table_node is None and result.segmentation_node is not None
    assert any("no QC scores" in line for line in job.log)


def test_a_damaged_qc_csv_fails_the_import_and_leaves_the_scene_unchanged(scene, tiny_model, tmp_path,
                                                                           input_volume):
    volume, m, _ = input_volume
    fake = fake_engine(tmp_path, _blocks(SEG_LABELS), m,
                       _parc_result(list(SEG_LABELS), [1.0] * len(SEG_LABELS), None), write_qc={})
    before = scene_node_ids(scene)
    job = SegmentationJob(scene, volume, SegmentOptions(model=str(tiny_model), qc=True), temp_root=tmp_path,
                          python=str(fake))
    job.start()
    with pytest.raises(SegmentationError, match="not a QC CSV"):
        job.wait(60)
    assert job.state is JobState.FAILED and scene_node_ids(scene) == before


def test_robust_with_the_default_model_runs_without_a_model_check(scene, model_home, tmp_path, input_volume):
    """No model installed: the module does not refuse, the engine picks its robust model."""
    volume, m, _ = input_volume
    fake = fake_engine(tmp_path, _blocks(SEG_LABELS), m,
                       _parc_result(list(SEG_LABELS), [1.0] * len(SEG_LABELS), None))
    job = SegmentationJob(scene, volume, SegmentOptions(robust=True), temp_root=tmp_path, python=str(fake))
    job.start()
    result = job.wait(60)
    args = json.loads((tmp_path / "args.json").read_text())
    assert "--robust" in args and "--model" not in args
    assert result.model_path is None
    assert result.segmentation_node.GetAttribute("SynthSegMONAI.Model").startswith("SynthSeg robust")


# --- the module: widget and scripting API --------------------------------------------------
def _fake_ui():
    root = ET.parse(fx.MODULE_DIR / "Resources" / "UI" / "SynthSegMONAI.ui").getroot()
    return types.SimpleNamespace(**{w.get("name"): fx.FakeWidget(w.get("name")) for w in root.iter("widget")})


def test_ui_declares_the_synthseg2_options():
    root = ET.parse(fx.MODULE_DIR / "Resources" / "UI" / "SynthSegMONAI.ui").getroot()
    widgets = {w.get("name"): w for w in root.iter("widget")}
    for name, flag in (("parcCheckBox", "--parc"), ("robustCheckBox", "--robust"), ("ctCheckBox", "--ct"),
                       ("qcCheckBox", "--qc")):
        assert widgets[name].get("class") == "QCheckBox"
        assert flag in widgets[name].findtext("property/string")
    assert widgets["outputQCTableSelector"].get("class") == "qMRMLNodeComboBox"
    receivers = {c.findtext("receiver") for c in root.iter("connection")}
    assert "outputQCTableSelector" in receivers


def test_widget_options_reach_the_parameter_node_and_back(module, scene, model_home, monkeypatch):
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: fx.FakeWidget("root"))
    ui = _fake_ui()
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda w: ui)
    add_volume(scene, np.ones((8, 8, 8), np.float32), np.eye(4), "T1")
    widget = module.SynthSegMONAIWidget()
    widget.setup()
    for box in (ui.parcCheckBox, ui.robustCheckBox, ui.ctCheckBox, ui.qcCheckBox):
        assert "toggled(bool)" in box.connections and not box.checked
    assert not ui.outputQCTableSelector.enabled  # QC off
    ui.parcCheckBox.checked = ui.qcCheckBox.checked = True
    widget.updateParameterNodeFromGUI()
    node = widget.logic.getParameterNode()
    assert node.GetParameter("Parcellation") == "true" and node.GetParameter("QualityControl") == "true"
    assert node.GetParameter("Robust") == "false" and node.GetParameter("CT") == "false"
    options = widget.currentOptions()
    assert options.parc and options.qc and not options.robust and not options.ct
    assert ui.outputQCTableSelector.enabled
    # parameter node -> GUI (e.g. a scene loaded)
    node.SetParameter("Robust", "true")
    assert ui.robustCheckBox.checked
    widget.setState(module.JobState.SEGMENTING)
    assert not ui.parcCheckBox.enabled and not ui.qcCheckBox.enabled and not ui.outputQCTableSelector.enabled
    widget.setState(module.JobState.IDLE)
    assert ui.parcCheckBox.enabled and ui.outputQCTableSelector.enabled
    done = widget._doneMessage(types.SimpleNamespace(qc_scores=QC))
    assert re.fullmatch(r"Done\. Lowest QC score: 0\.67 \(putamen\+pallidum\)\.", done)
    assert widget._doneMessage(types.SimpleNamespace(qc_scores=None)) == widget.DONE
    widget.cleanup()


def test_scripting_api_passes_the_options_and_keeps_the_qc_table(module, scene, tiny_model, tmp_path,
                                                                 monkeypatch, input_volume):
    from SynthSegMONAISlicerLib import segment_job

    volume, m, _ = input_volume
    labels, volumes = _parc_volumes()
    fake = fake_engine(tmp_path, _blocks(PARC_BLOCKS), m, _parc_result(labels[1:], volumes, QC))
    monkeypatch.setattr(segment_job, "python_executable", lambda: str(fake))
    logic = module.SynthSegMONAILogic()
    logic.tempRoot = str(tmp_path)
    seg, table = logic.segment(volume, model=str(tiny_model), parc=True, robust=True, qc=True, timeout=60)
    args = json.loads((tmp_path / "args.json").read_text())
    assert {"--parc", "--robust", "--qc"} <= set(args)
    assert {s.GetName() for s in _segments(seg).values()} == {parcellation.parcel(lab).name for lab in PARC_BLOCKS}
    assert logic.lastResult.table_node is table
    assert dict(qc_table.qc_rows(logic.lastResult.qc_table_node)) == pytest.approx(QC)


# --- the real engine, once it has the flags -------------------------------------------------
def _engine_has(flag: str) -> bool:
    from SynthSegMONAILib.cli import segment_parser

    return flag in segment_parser().format_help()


@pytest.mark.skipif(not _engine_has("--ct"), reason="the engine has no --ct yet")
def test_ct_through_the_real_command_line(scene, tiny_model, tmp_path):
    from SynthSegMONAISlicerLib.testing import phantom

    shape = (32, 32, 32)
    m = fx.centred_affine(shape, (1.0, 1.0, 1.0))
    volume = add_volume(scene, phantom(shape, m, scale=80.0), m, "CT")
    job = SegmentationJob(scene, volume, SegmentOptions(model=str(tiny_model), device="cpu", ct=True),
                          temp_root=tmp_path)
    job.start()
    result = job.wait(300)
    assert job.state is JobState.DONE and result.segmentation_node.GetSegmentation().GetNumberOfSegments() > 0
