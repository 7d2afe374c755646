"""Shared helpers for the Slicer module tests: a real MRML scene (slicer-core), volumes,
a tiny model with predictable output. Only what slicer-core lacks gets test doubles."""

from __future__ import annotations

import importlib
import os
import sys
import types
import unittest
from pathlib import Path

import numpy as np
import pytest
import slicer

REPO = Path(__file__).resolve().parents[3]
MODULE_DIR = REPO / "SynthSegMONAI"  # on sys.path (conftest.py): the Slicer module and its packages


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:  # no /proc: the kill above succeeded, so it is still there
        return False


def new_scene():
    """A fresh real MRML scene, installed as ``slicer.mrmlScene``."""
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    return scene


def add_volume(scene, array_ijk: np.ndarray, ijk_to_ras: np.ndarray, name: str = "Input",
               class_name: str = "vtkMRMLScalarVolumeNode"):
    """Add a volume node whose voxel [i, j, k] is ``array_ijk[i, j, k]``."""
    arr = np.asarray(array_ijk)
    kji = np.ascontiguousarray(arr.transpose(2, 1, 0) if arr.ndim == 3 else arr.transpose(2, 1, 0, 3))
    node = slicer.util.addVolumeFromArray(kji, ijk_to_ras, name, class_name)
    return node


def scene_node_ids(scene) -> list[str]:
    """IDs of every node in the scene (to check that a failed run changed nothing)."""
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def affine(spacing=(1.0, 1.0, 1.0), axes=None, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 IJK-to-RAS from a 3x3 direction matrix (columns = axes) and spacing."""
    m = np.eye(4)
    d = np.eye(3) if axes is None else np.asarray(axes, float)
    m[:3, :3] = d * np.asarray(spacing, float)
    m[:3, 3] = origin
    return m


def rotation(axis: str, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


def centred_affine(shape, spacing, axes=None) -> np.ndarray:
    """Affine whose volume centre is at RAS (0, 0, 0)."""
    m = affine(spacing, axes)
    centre = m[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    m[:3, 3] = -centre
    return m


@pytest.fixture
def scene():
    return new_scene()


@pytest.fixture
def model_home(tmp_path, monkeypatch):
    """A private per-user model folder and no extra search folders."""
    home = tmp_path / "synthseg-home"
    monkeypatch.setenv("SYNTHSEG_MONAI_HOME", str(home))
    monkeypatch.delenv("SYNTHSEG_MONAI_MODELS", raising=False)
    return home


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from SynthSegMONAISlicerLib.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny.safetensors",
                           preprocessing={"min_pad": 1})


# --- doubles for what slicer-core lacks (Qt widgets, slicer.app, base classes) --------------
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


def install_doubles(monkeypatch, version: tuple[int, int] = (5, 12)):
    """Stand-ins for what slicer-core lacks (qt, the module base classes, ``slicer.app``), then
    a fresh import of the module file. ``version`` is the Slicer version ``slicer.app`` reports."""
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
            return str(MODULE_DIR / "Resources" / rel)

    class ScriptedLoadableModuleLogic:
        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode("SynthSegMONAI", "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag("SynthSegMONAI")
                node = slicer.mrmlScene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        messages: list[str] = []

        def delayDisplay(self, message, msec=None):
            ScriptedLoadableModuleTest.messages.append(message)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", slm, raising=False)

    app = types.SimpleNamespace(connections=[], processEvents=lambda: None,
                                layoutManager=lambda: None, majorVersion=version[0],
                                minorVersion=version[1], testingEnabled=lambda: False)
    app.connect = lambda signal, slot: app.connections.append((signal, slot))
    monkeypatch.setattr(slicer, "app", app, raising=False)
    sys.modules.pop("SynthSegMONAI", None)
    return importlib.import_module("SynthSegMONAI")


@pytest.fixture
def module(monkeypatch, scene):
    """The module file imported with the doubles installed (Slicer 5.12)."""
    mod = install_doubles(monkeypatch)
    yield mod
    sys.modules.pop("SynthSegMONAI", None)
