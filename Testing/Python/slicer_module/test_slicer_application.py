"""What only the real Slicer application would show: how it loads the modules' files, first-use
installation, a self-test without PyTorch, a Cancel that must not block the GUI, the minimum
version, and the Sample Data entry.

The scene and logic are real (slicer-core); qt, ``slicer.app``, the module base classes,
``slicer.packaging``, ``SampleData`` and ``PyTorchUtils`` get doubles (see slicer_fixtures).
"""

from __future__ import annotations

import ast
import hashlib
import re
import shutil
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest
import slicer
import slicer_fixtures as fx
import tomllib
from slicer_fixtures import REPO, add_volume, centred_affine, install_doubles, scene_node_ids

from SynthSegMONAISlicerLib import dependencies
from SynthSegMONAISlicerLib.job_state import JobState
from SynthSegMONAISlicerLib.options import SegmentOptions
from SynthSegMONAISlicerLib.process_runner import FinishedEvent, LogEvent, ProcessRunner
from SynthSegMONAISlicerLib.testing import phantom

scene, tiny_model, model_home, module = fx.scene, fx.tiny_model, fx.model_home, fx.module
MODULES = {"SynthSegMONAI": REPO / "SynthSegMONAI", "SynthSegMONAITraining": REPO / "SynthSegMONAITraining"}
TRAINING_DIR = MODULES["SynthSegMONAITraining"]


def _cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(r"set\(" + variable + r"\s+(.*?)\)", re.sub(r"#.*", "", text), re.S)
    return match.group(1).split() if match else []


# --- files Slicer would take for modules ---------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODULES))
def test_only_the_module_file_is_installed_in_the_scripted_modules_folder(name):
    """Slicer loads every top-level .py file there as a module (one starting with #! as a CLI)."""
    text = (MODULES[name] / "CMakeLists.txt").read_text()
    scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    top_level = [s for s in scripts if "/" not in s]
    assert top_level == ["${MODULE_NAME}.py"], top_level


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_python_file_of_the_modules_starts_with_a_shebang(name):
    starting = [str(p.relative_to(REPO)) for p in MODULES[name].rglob("*.py")
                if p.read_bytes().lstrip(b"\xef\xbb\xbf")[:2] == b"#!"]
    assert starting == []


def test_training_entry_scripts_are_installed_in_their_own_folder():
    module = _training_module()
    text = (TRAINING_DIR / "CMakeLists.txt").read_text()
    entry = _cmake_list(text, "MODULE_ENTRY_SCRIPTS")
    assert sorted(entry) == sorted(module.ENTRY_SCRIPTS)
    top_level = {p.name for p in TRAINING_DIR.glob("*.py")} - {"SynthSegMONAITraining.py"}
    assert top_level == set(entry)
    assert "/${MODULE_NAME}Scripts" in text and module.SCRIPTS_FOLDER == "SynthSegMONAITrainingScripts"


def _training_module():
    sys.modules.pop("SynthSegMONAITraining", None)
    import SynthSegMONAITraining

    return SynthSegMONAITraining


def _installed_layout(root: Path) -> Path:
    """The scripted-modules folder as the extension installs it (both modules share it)."""
    modules = root / "qt-scripted-modules"
    for package in ("SynthSegMONAI/SynthSegMONAILib", "SynthSegMONAI/SynthSegMONAISlicerLib",
                    "SynthSegMONAITraining/SynthSegMONAITrainingLib"):
        shutil.copytree(REPO / package, modules / Path(package).name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(TRAINING_DIR / "SynthSegMONAITraining.py", modules)
    (modules / "Resources").mkdir()
    for name in ("requirements.txt", "requirements-training.txt"):
        shutil.copy(REPO / "Resources" / name, modules / "Resources")
    scripts = modules / "SynthSegMONAITrainingScripts"
    scripts.mkdir()
    for name in ("train.py", "train_round.py", "make_label_cache.py"):
        shutil.copy(TRAINING_DIR / name, scripts)
    return modules


def _run_script(modules: Path, script: str, args: list[str], prelude: str = "") -> subprocess.CompletedProcess:
    """Run an installed entry script as ``Slicer --python-script`` does (``__main__``, argv)."""
    code = textwrap.dedent(f"""
        import runpy, sys
        {prelude}
        sys.argv = [{script!r}, *{args!r}]
        try:
            runpy.run_path({str(modules / 'SynthSegMONAITrainingScripts' / script)!r}, run_name="__main__")
        except SystemExit as e:
            code = e.code
        else:
            code = 0
        import SynthSegMONAITrainingLib
        print("LIB", SynthSegMONAITrainingLib.__file__)
        sys.exit(code)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=modules.parent)


def test_entry_scripts_run_from_the_installed_layout(tmp_path):
    modules = _installed_layout(tmp_path)
    for script in ("train.py", "train_round.py", "make_label_cache.py"):
        done = _run_script(modules, script, ["--help"])
        assert done.returncode == 0, done.stderr
        assert "usage:" in done.stdout
        assert f"LIB {modules / 'SynthSegMONAITrainingLib' / '__init__.py'}" in done.stdout


def test_entry_script_in_slicer_checks_requirements_before_importing_them(tmp_path):
    modules = _installed_layout(tmp_path)
    old_slicer = ("import types; sys.modules['slicer'] = types.SimpleNamespace("
                  "app=types.SimpleNamespace(majorVersion=5, minorVersion=8))")
    done = _run_script(modules, "train.py", ["--help"], prelude=old_slicer)
    assert done.returncode == 1
    assert "needs 3D Slicer 5.10 or later; this is Slicer 5.8" in done.stderr
    assert "usage:" not in done.stdout


# --- requirements ----------------------------------------------------------------------------
PROVIDED = {
    "slicer", "vtk", "qt", "ctk", "SampleData", "PyTorchUtils",  # the Slicer application
    "torch",  # the PyTorch extension (PyTorchUtils)
    "SynthSegMONAILib", "SynthSegMONAISlicerLib", "SynthSegMONAITrainingLib", "SynthSegMONAI",
    "SynthSegMONAITraining",  # this extension
}


def _optional(node: ast.AST, parents: dict) -> bool:
    """An import inside ``try: ... except ImportError`` (it has a fallback)."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            return True
    return False


def _third_party_imports(folder: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in PROVIDED or _optional(node, parents):
                    continue
                found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


@pytest.mark.parametrize("name,files", [("SynthSegMONAI", ("requirements.txt",)),
                                        ("SynthSegMONAITraining", ("requirements.txt", "requirements-training.txt"))])
def test_requirements_cover_every_import_of_the_module(name, files):
    """Each module installs on first use every package its files import (Slicer bundles none)."""
    covered = set()
    for f in files:
        covered |= {dependencies.import_name(r) for r in dependencies.read_requirements(REPO / "Resources" / f)}
    imports = _third_party_imports(MODULES[name])
    if name == "SynthSegMONAITraining":  # it runs the segmentation engine's code too
        imports.update(_third_party_imports(MODULES["SynthSegMONAI"] / "SynthSegMONAILib"))
    missing = {top: sorted(paths) for top, paths in imports.items() if top not in covered}
    assert not missing, f"imported but in no requirements file of {name}: {missing}"


def test_training_requirements_match_the_train_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = dependencies.read_requirements(REPO / "Resources" / "requirements-training.txt")
    assert all(">=" in r and "==" not in r for r in reqs)
    extra = {dependencies.distribution_name(r).lower() for r in project["optional-dependencies"]["train"]}
    assert {dependencies.distribution_name(r).lower() for r in reqs} == extra
    assert dependencies.missing_requirements(reqs) == []


def test_versions_are_checked_not_only_imports():
    assert dependencies.is_importable("numpy>=999") and not dependencies.is_satisfied("numpy>=999")
    assert dependencies.is_satisfied("numpy>=1.0")
    assert dependencies.missing_requirements(["numpy>=999", "numpy>=1"]) == ["numpy>=999"]
    assert dependencies.version_satisfies("2.1.0+cu121", "torch>=2.1")
    assert not dependencies.version_satisfies("2.0.1", "torch>=2.1")


# --- first-use installation ------------------------------------------------------------------
@pytest.fixture
def slicer_packaging(tmp_path, monkeypatch):
    """A ``slicer/packaging.py`` that only an explicit ``import slicer.packaging`` reaches."""
    folder = tmp_path / "slicer_packaging"
    folder.mkdir()
    (folder / "packaging.py").write_text(textwrap.dedent("""
        calls = []
        decline = False

        def pip_ensure(requirements, requester=None, **kwargs):
            calls.append((list(map(str, requirements)), requester))
            if decline:
                raise RuntimeError("User declined package installation")
    """))
    assert not hasattr(slicer, "packaging")
    monkeypatch.setattr(slicer, "__path__", [*slicer.__path__, str(folder)])
    yield folder
    sys.modules.pop("slicer.packaging", None)
    if hasattr(slicer, "packaging"):
        delattr(slicer, "packaging")


def test_slicer_packaging_is_imported_explicitly(slicer_packaging, monkeypatch):
    monkeypatch.setattr(dependencies, "is_satisfied", lambda r: not r.startswith("monai"))
    monkeypatch.setattr(slicer.util, "pip_install", lambda *a, **k: pytest.fail("the old path was taken"),
                        raising=False)
    with pytest.raises(dependencies.DependencyError, match="still missing"):
        dependencies.ensure_packages(["monai>=1.3", "numpy>=1.24"], confirm=lambda text: True)
    assert sys.modules["slicer.packaging"].calls == [(["monai>=1.3"], "SynthSegMONAI")]


def test_declining_pip_ensure_gives_a_message_not_a_traceback(slicer_packaging, monkeypatch):
    monkeypatch.setattr(dependencies, "is_satisfied", lambda r: not r.startswith("monai"))
    import slicer.packaging

    monkeypatch.setattr(slicer.packaging, "decline", True)
    with pytest.raises(dependencies.DependencyError, match="nothing was installed"):
        dependencies.ensure_packages(["monai>=1.3"], confirm=lambda text: True)


def test_declining_the_older_pip_install_path(monkeypatch):
    installed = []
    monkeypatch.setattr(slicer.util, "pip_install", lambda reqs: installed.append(reqs), raising=False)
    with pytest.raises(dependencies.DependencyError, match="nothing was installed"):
        dependencies.ensure_packages(["numpy>=999"], confirm=lambda text: False)
    assert installed == []
    # accepted, but the installed version still does not fit: said so, not ignored
    with pytest.raises(dependencies.DependencyError, match="still missing or too old: numpy>=999"):
        dependencies.ensure_packages(["numpy>=999", "numpy>=1"], confirm=lambda text: True)
    assert installed == [["numpy>=999"]]


def test_declining_pytorch(monkeypatch):
    monkeypatch.setattr(dependencies, "is_satisfied", lambda r: not r.startswith("torch"))
    calls = []
    fake = types.SimpleNamespace(PyTorchUtilsLogic=lambda: types.SimpleNamespace(
        installTorch=lambda **kw: calls.append(kw)))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", fake)
    with pytest.raises(dependencies.DependencyError, match="PyTorch is required"):
        dependencies.ensure_torch(lambda text: False)
    assert calls == []


def test_widget_reports_a_declined_installation(make_widget, slicer_packaging, monkeypatch):
    widget, ui = make_widget()
    monkeypatch.setattr(dependencies, "is_satisfied", lambda r: not r.startswith("monai"))
    import slicer.packaging

    monkeypatch.setattr(slicer.packaging, "decline", True)
    errors = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, *a, **k: errors.append(text), raising=False)
    widget.onApplyButton()  # must not raise
    assert widget._state is JobState.FAILED and errors and "nothing was installed" in errors[0]
    assert ui.applyButton.text == "Segment" and ui.applyButton.enabled
    widget.onInstallDependencies()
    assert len(errors) == 2


def test_training_module_asks_for_its_own_requirements(monkeypatch, slicer_packaging):
    training = _training_module()
    app = types.SimpleNamespace(majorVersion=5, minorVersion=12, testingEnabled=lambda: False)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(dependencies, "is_satisfied", lambda r: not r.startswith(("cornucopia", "pyyaml")))
    problem = training.ensureRequirements()
    assert "still missing" in problem  # the double installs nothing
    calls = sys.modules["slicer.packaging"].calls
    assert calls == [(["cornucopia>=0.5", "pyyaml>=6"], "SynthSegMONAITraining")]
    assert training.SynthSegMONAITrainingLogic().train(["--help"]) == 1  # refused before importing yaml
    app.minorVersion = 8
    assert "needs 3D Slicer 5.10" in training.ensureRequirements()


# --- the self-test without PyTorch -----------------------------------------------------------
def _sample_data(scene):
    """A SampleData double: 'MRHead' is a phantom head; registrations are recorded."""
    registered = []

    def download(name):
        assert name == "MRHead"
        shape = (48, 52, 44)
        m = centred_affine(shape, (1.1, 1.0, 1.2))
        return add_volume(scene, phantom(shape, m), m, "MRHead")

    logic = types.SimpleNamespace(registerCustomSampleDataSource=lambda **kw: registered.append(kw),
                                  registerCustomSampleDataCategory=lambda *a, **kw: None)
    return types.SimpleNamespace(downloadSample=download, SampleDataLogic=logic, registered=registered)


def test_self_test_without_pytorch_skips_inference_and_tests_the_rest(module, scene, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # as on Slicer's test machines
    assert not dependencies.torch_available()
    monkeypatch.setitem(sys.modules, "SampleData", _sample_data(scene))
    test = module.SynthSegMONAITest()
    test.runTest()
    messages = module.ScriptedLoadableModuleTest.messages
    assert "Scene side passed" in messages
    assert any("PyTorch is not installed" in m and "skipped" in m for m in messages)
    assert "Test passed" not in messages and "Segmenting (CPU)" not in messages


def test_self_test_scene_side_fails_on_a_wrong_terminology(module, scene, monkeypatch):
    from SynthSegMONAISlicerLib import segmentation_import

    monkeypatch.setitem(sys.modules, "SampleData", _sample_data(scene))
    monkeypatch.setattr(segmentation_import, "TYPES_WITHOUT_MODIFIERS", set())
    with pytest.raises(AssertionError):
        module.SynthSegMONAITest().test_SynthSegMONAI_SceneSide()


# --- Cancel does not block --------------------------------------------------------------------
IGNORES_SIGTERM = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # inherits SIG_IGN
print("CHILD", child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_cancel_returns_at_once_while_the_child_ignores_sigterm(tmp_path):
    script = tmp_path / "stubborn.py"
    script.write_text(IGNORES_SIGTERM)
    runner = ProcessRunner([sys.executable, str(script)])
    runner.start()
    events, deadline = [], time.monotonic() + 20
    while not any(isinstance(e, LogEvent) and e.text.startswith("CHILD") for e in events):
        assert time.monotonic() < deadline
        events += runner.poll(0.1)
    child = int(next(e.text.split()[1] for e in events if isinstance(e, LogEvent) and e.text.startswith("CHILD")))
    t0 = time.monotonic()
    runner.cancel(grace_s=2.0)
    assert time.monotonic() - t0 < 0.5
    assert runner.cancelling and not fx.process_gone(runner.pid)
    finished = []
    while not finished:
        assert time.monotonic() - t0 < 20
        finished = [e for e in runner.poll(0.1) if isinstance(e, FinishedEvent)]
    assert finished[0].cancelled and time.monotonic() - t0 >= 2.0  # killed after the grace period
    assert fx.process_gone(runner.pid) and fx.process_gone(child)


@pytest.fixture
def make_widget(module, scene, monkeypatch):
    """Build the module's widget on fake Qt widgets (named as in the .ui file), over a T1 phantom."""
    import xml.etree.ElementTree as ET

    made = []

    def make():
        ui_root = fx.FakeWidget("root")
        monkeypatch.setattr(slicer.util, "loadUI", lambda path: ui_root)
        root = ET.parse(fx.MODULE_DIR / "Resources" / "UI" / "SynthSegMONAI.ui").getroot()
        ui = types.SimpleNamespace(**{w.get("name"): fx.FakeWidget(w.get("name")) for w in root.iter("widget")})
        monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda w: ui)
        shape = (40, 40, 40)
        m = centred_affine(shape, (1.0, 1.0, 1.0))
        add_volume(scene, phantom(shape, m), m, "T1")
        widget = module.SynthSegMONAIWidget()
        widget.setup()
        made.append(widget)
        return widget, ui

    yield make
    for widget in made:
        widget.cleanup()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_cancel_button_answers_at_once_and_the_run_ends_cancelled(make_widget, scene, tiny_model, model_home,
                                                                  tmp_path, monkeypatch):
    from SynthSegMONAISlicerLib import segment_job

    engine = tmp_path / "stubborn_engine"
    engine.write_text("#!/bin/sh\ntrap '' TERM\n"
                      "echo 'SYNTHSEG_PROGRESS {\"stage\": \"network\", \"fraction\": 0.3}'\nexec sleep 60\n")
    engine.chmod(0o755)
    monkeypatch.setattr(segment_job, "python_executable", lambda: str(engine))
    widget, ui = make_widget()
    work = tmp_path / "work"
    work.mkdir()
    widget.logic.tempRoot = str(work)
    monkeypatch.setattr(widget, "currentOptions", lambda: SegmentOptions(model=str(tiny_model), device="cpu"))
    before = scene_node_ids(scene)
    widget.onApplyButton()
    assert widget._state is JobState.SEGMENTING and ui.applyButton.text == "Cancel"
    deadline = time.monotonic() + 20
    while ui.progressBar.value == 0:  # the engine is running and has reported progress
        assert time.monotonic() < deadline
        widget.onTimer()
        time.sleep(0.05)
    pid = widget._job.pid
    t0 = time.monotonic()
    widget.onApplyButton()  # Cancel
    assert time.monotonic() - t0 < 0.5
    assert widget._state is JobState.CANCELLING
    assert ui.applyButton.text == "Cancelling..." and not ui.applyButton.enabled
    assert not ui.inputVolumeSelector.enabled
    while widget._state is not JobState.IDLE:
        assert time.monotonic() - t0 < 20
        widget.onTimer()
        time.sleep(0.1)
    assert ui.statusLabel.text == "Cancelled." and ui.applyButton.text == "Segment" and ui.applyButton.enabled
    assert fx.process_gone(pid)
    assert scene_node_ids(scene) == before and list(work.iterdir()) == []


# --- minimum Slicer version --------------------------------------------------------------------
def test_older_slicer_is_refused_with_a_clear_message(scene, monkeypatch):
    shown = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, *a, **k: shown.append(text), raising=False)
    with pytest.raises(ImportError, match=r"needs 3D Slicer 5\.10 or later; this is Slicer 5\.8"):
        install_doubles(monkeypatch, version=(5, 8))
    slots = [slot for signal, slot in slicer.app.connections if signal == "startupCompleted()"]
    assert len(slots) == 1
    slots[0]()
    assert shown and "5.10" in shown[0]
    sys.modules.pop("SynthSegMONAI", None)
    assert install_doubles(monkeypatch, version=(5, 10)).SynthSegMONAI
    sys.modules.pop("SynthSegMONAI", None)


def test_minimum_version_is_the_same_everywhere():
    from SynthSegMONAISlicerLib.slicer_version import MINIMUM_SLICER_VERSION

    minimum = ".".join(map(str, MINIMUM_SLICER_VERSION))
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert f'set(SynthSegMONAI_MINIMUM_SLICER_VERSION "{minimum}")' in cmake
    assert "VERSION_LESS SynthSegMONAI_MINIMUM_SLICER_VERSION" in cmake and "FATAL_ERROR" in cmake
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Using SynthSeg-MONAI in 3D Slicer"):readme.index("## Training SynthSeg-MONAI")]
    assert f"3D Slicer {minimum} or later" in section


def test_what_runs_before_the_version_check_is_python_3_9():
    """On Slicer < 5.10 (Python 3.9) the check must run, so that the message is shown."""
    ast.parse((fx.MODULE_DIR / "SynthSegMONAISlicerLib" / "slicer_version.py").read_text(), feature_version=(3, 9))
    source = (fx.MODULE_DIR / "SynthSegMONAI.py").read_text()
    ast.parse(source, feature_version=(3, 9))
    before = source[:source.index("refuse_old_slicer(slicer")]
    assert "SynthSegMONAISlicerLib import dependencies" not in before and "segment_job" not in before


# --- Sample Data ------------------------------------------------------------------------------
def test_sample_scan_is_registered_with_sample_data(module, scene, monkeypatch, tmp_path):
    from SynthSegMONAISlicerLib.volume_export import check_input_volume

    sample_data = _sample_data(scene)
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)
    module.SynthSegMONAI(types.SimpleNamespace())
    slot = next(slot for signal, slot in slicer.app.connections if signal == "startupCompleted()")
    monkeypatch.setattr(module, "registerTerminology", lambda: None)
    slot()
    assert len(sample_data.registered) == 1
    entry = sample_data.registered[0]
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "https://github.com/([^"]+)"\)',
                         (REPO / "CMakeLists.txt").read_text()).group(1)
    prefix = f"https://raw.githubusercontent.com/{homepage}/main/"
    assert entry["uris"].startswith(prefix)
    local = REPO / entry["uris"][len(prefix):]
    assert local.is_file() and local.name == entry["fileNames"]
    assert entry["checksums"] == "SHA256:" + hashlib.sha256(local.read_bytes()).hexdigest()
    assert entry["category"] and entry["sampleName"] and entry["nodeNames"]
    thumbnail = Path(entry["thumbnailFileName"])
    from PIL import Image

    with Image.open(thumbnail) as im:
        assert im.format == "PNG" and 200 <= im.width <= 320 and 200 <= im.height <= 320
    cmake = (fx.MODULE_DIR / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "SynthSegMONAI")
    assert str(thumbnail.relative_to(fx.MODULE_DIR)) in cmake
    # Slicer's own reader loads the file into a volume the module accepts
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", entry["nodeNames"])
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(local))
    assert storage.ReadData(node)
    check_input_volume(node)
    assert node.GetImageData().GetDimensions() == (181, 217, 181)
    assert np.asarray(slicer.util.arrayFromVolume(node)).max() > 0
