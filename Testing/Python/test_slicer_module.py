"""The module file itself (SynthSegMONAI.py): metadata, scripting API, widget state machine.

slicer-core has no Qt, no ``slicer.app`` and no ScriptedLoadableModule base classes: only
those get test doubles here; the scene, nodes and logic are real.
"""

from __future__ import annotations

import importlib
import sys
import types
import unittest
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import slicer
import slicer_fixtures as fx
from slicer_fixtures import add_volume, centred_affine, scene_node_ids

from SynthSegMONAISlicerLib.testing import phantom

scene, tiny_model, model_home = fx.scene, fx.tiny_model, fx.model_home


class FakeWidget:
    """Stands in for any Qt widget: remembers properties, records calls and connections."""

    def __init__(self, name: str = ""):
        self.__dict__.update(name=name, enabled=True, text="", toolTip="", checked=False, value=0,
                             connections={}, items=[], index=0, current=None)

    def connect(self, signal, slot):
        self.connections.setdefault(signal, []).append(slot)

    def addItem(self, text, data=None):
        self.items.append((text, data))

    def insertSeparator(self, index):
        self.items.append(("", None))

    def clear(self):
        self.items.clear()

    @property
    def count(self):
        return len(self.items)

    def findData(self, data):
        return next((i for i, (_, d) in enumerate(self.items) if d == data), -1)

    def findText(self, text):
        return next((i for i, (t, _) in enumerate(self.items) if t == text), -1)

    def setCurrentIndex(self, i):
        self.index = i

    @property
    def currentData(self):
        return self.items[self.index][1] if self.items else None

    def itemData(self, i):
        return self.items[i][1]

    def blockSignals(self, b):
        return False

    def setCurrentNode(self, node):
        self.current = node

    def currentNode(self):
        return self.current

    @property
    def currentNodeID(self):
        return self.current.GetID() if self.current else None

    def __getattr__(self, name):  # any other Qt method: accept and ignore
        return lambda *a, **k: None


def install_doubles(monkeypatch):
    qt = types.ModuleType("qt")

    class QTimer(FakeWidget):
        def start(self):
            self.active = True

        def stop(self):
            self.active = False

    qt.QTimer = QTimer
    qt.QFileDialog = types.SimpleNamespace(getOpenFileName=lambda *a: "", getSaveFileName=lambda *a: "")
    monkeypatch.setitem(sys.modules, "qt", qt)

    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent or types.SimpleNamespace(isEntered=True)
            self.layout = FakeWidget("layout")

        def setup(self):
            pass

        def resourcePath(self, rel):
            return str(fx.MODULE_DIR / "Resources" / rel)

    class ScriptedLoadableModuleLogic:
        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode("SynthSegMONAI", "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag("SynthSegMONAI")
                node = slicer.mrmlScene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", slm, raising=False)

    app = types.SimpleNamespace(connections=[], processEvents=lambda: None,
                                layoutManager=lambda: None)
    app.connect = lambda signal, slot: app.connections.append((signal, slot))
    monkeypatch.setattr(slicer, "app", app, raising=False)
    sys.modules.pop("SynthSegMONAI", None)
    return importlib.import_module("SynthSegMONAI")


@pytest.fixture
def module(monkeypatch, scene):
    mod = install_doubles(monkeypatch)
    yield mod
    sys.modules.pop("SynthSegMONAI", None)


def test_module_metadata(module):
    parent = types.SimpleNamespace()
    module.SynthSegMONAI(parent)
    assert parent.title and parent.categories == ["Segmentation"]
    assert parent.contributors
    assert "SynthSeg: Segmentation of brain MRI scans of any contrast and resolution" in parent.helpText
    assert "Segment" in parent.helpText and parent.acknowledgementText
    assert any(sig == "startupCompleted()" for sig, _ in slicer.app.connections)


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
