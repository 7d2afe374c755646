"""The module file itself (SynthSegMONAI.py): metadata, scripting API, widget state machine.

slicer-core has no Qt, no ``slicer.app`` and no ScriptedLoadableModule base classes: only
those get test doubles here; the scene, nodes and logic are real.
"""

from __future__ import annotations

import types
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import slicer
import slicer_fixtures as fx
from slicer_fixtures import add_volume, centred_affine, scene_node_ids

from SynthSegMONAISlicerLib.testing import phantom

scene, tiny_model, model_home, module = fx.scene, fx.tiny_model, fx.model_home, fx.module
FakeWidget = fx.FakeWidget


def test_module_metadata(module):
    parent = types.SimpleNamespace()
    module.SynthSegMONAI(parent)
    assert parent.title and parent.categories == ["Segmentation"]
    assert parent.contributors
    assert "SynthSeg: Segmentation of brain MRI scans of any contrast and resolution" in parent.helpText
    assert "Segment" in parent.helpText and parent.acknowledgementText
    assert f'<a href="{module.DOCUMENTATION_URL}">' in parent.helpText
    assert module.DOCUMENTATION_URL.endswith("#using-synthseg-monai-in-3d-slicer")
    assert any(sig == "startupCompleted()" for sig, _ in slicer.app.connections)


def test_documentation_links_point_at_readme_sections():
    """The help panels link to the README sections (GitHub anchors of their headings)."""
    import re

    from slicer_fixtures import REPO

    readme = (REPO / "README.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^## (.+)$", readme, re.M)}
    for path in (fx.MODULE_DIR / "SynthSegMONAI.py", REPO / "SynthSegMONAITraining" / "SynthSegMONAITraining.py"):
        url = re.search(r'DOCUMENTATION_URL = "([^"]+)"', path.read_text()).group(1)
        assert url.startswith("https://github.com/SynthSegMONAI/SlicerSynthSegMONAI#")
        assert url.split("#", 1)[1] in anchors, url
        assert "{url}" in path.read_text() and '<a href=\\"{url}\\">' in path.read_text()


def test_scripting_api_segment(module, scene, tiny_model, tmp_path):
    shape = (32, 32, 32)
    m = centred_affine(shape, (1.2, 1.2, 1.2))
    volume = add_volume(scene, phantom(shape, m), m, "T1")
    logic = module.SynthSegMONAILogic()
    logic.tempRoot = str(tmp_path)
    seg, table = logic.segment(volume, model=str(tiny_model), device="cpu", timeout=300)
    assert seg.GetName() == "T1 SynthSeg" and table.GetName() == "T1 SynthSeg volumes"
    names = {seg.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(seg.GetSegmentation().GetNumberOfSegments())}
    assert names == {"Left-Cerebral-White-Matter", "Right-Cerebral-White-Matter", "CSF"}
    assert table.GetNumberOfRows() == 3
    assert list(tmp_path.iterdir()) == []


def test_scripting_api_bad_input_message(module, scene, tiny_model):
    rgb = add_volume(scene, np.zeros((8, 8, 8, 3), np.uint8), np.eye(4), "photo", "vtkMRMLVectorVolumeNode")
    before = scene_node_ids(scene)
    with pytest.raises(module.SegmentationError, match="colour or vector volume"):
        module.SynthSegMONAILogic().segment(rgb, model=str(tiny_model))
    assert scene_node_ids(scene) == before


def _fake_ui():
    root = ET.parse(fx.MODULE_DIR / "Resources" / "UI" / "SynthSegMONAI.ui").getroot()
    return types.SimpleNamespace(**{w.get("name"): FakeWidget(w.get("name")) for w in root.iter("widget")})


def test_widget_state_machine_and_parameter_node(module, scene, model_home, monkeypatch):
    ui_root = FakeWidget("root")
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: ui_root)
    ui = _fake_ui()
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda w: ui)
    volume = add_volume(scene, np.ones((8, 8, 8), np.float32), np.eye(4), "T1")
    widget = module.SynthSegMONAIWidget()
    widget.setup()
    # defaults: the volume in the scene is picked, options from the parameter node
    assert ui.inputVolumeSelector.currentNode() is volume
    assert ui.applyButton.enabled and ui.applyButton.text == "Segment"
    assert [d for _, d in ui.deviceComboBox.items] == ["auto", "cpu", "cuda"]
    assert ui.modelComboBox.items[-2:] == [("Add model file...", widget.ADD_MODEL),
                                          ("Import SynthSeg .h5 from FreeSurfer...", widget.IMPORT_H5)]
    # GUI -> parameter node
    ui.fastCheckBox.checked = True
    ui.deviceComboBox.setCurrentIndex(1)
    widget.updateParameterNodeFromGUI()
    node = widget.logic.getParameterNode()
    assert node.GetParameter("Fast") == "true" and node.GetParameter("Device") == "cpu"
    # states: segmenting turns Segment into Cancel and locks the inputs
    widget.setState(module.JobState.SEGMENTING, "Segmenting...")
    assert ui.applyButton.text == "Cancel" and ui.applyButton.enabled
    assert not ui.inputVolumeSelector.enabled and not ui.modelComboBox.enabled
    widget.setState(module.JobState.IMPORTING)
    assert not ui.applyButton.enabled
    widget.setState(module.JobState.FAILED, "boom")
    assert ui.applyButton.text == "Segment" and ui.applyButton.enabled and ui.statusLabel.text == "boom"
    # no input: Segment disabled
    ui.inputVolumeSelector.setCurrentNode(None)
    widget.setState(module.JobState.IDLE)
    assert not ui.applyButton.enabled
    widget.cleanup()
    assert not widget.hasObserver(scene, scene.StartCloseEvent, widget.onSceneStartClose)
