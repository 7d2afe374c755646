"""Extension packaging: UI file, CMake file lists, catalogue entry, metadata, screenshot,
translatable strings."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from slicer_fixtures import MODULE_DIR, REPO

UI_FILE = MODULE_DIR / "Resources" / "UI" / "SynthSegMONAI.ui"
MODULE_DIRS = ["SynthSegMONAI", "SynthSegMONAITraining"]
RESOURCE_SUFFIXES = {".png", ".jpg", ".svg", ".ui", ".json", ".csv", ".txt", ".yaml", ".yml", ".h5",
                     ".safetensors", ".qss"}


def test_ui_file_is_well_formed_and_has_every_widget_the_code_uses():
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui"
    names = {w.get("name") for w in root.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE_DIR / "SynthSegMONAI.py").read_text()))
    assert used, "the widget uses no ui members?"
    assert used <= names, f"missing in the .ui: {sorted(used - names)}"
    # every custom widget class used is declared
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    qt_builtin = {"QLabel", "QComboBox", "QCheckBox", "QSpinBox", "QPushButton", "QProgressBar",
                  "QPlainTextEdit", "QWidget"}
    classes = {w.get("class") for w in root.iter("widget")}
    assert classes - qt_builtin <= declared


def _cmake_listed_files(cmake: Path) -> set[str]:
    text = re.sub(r"#.*", "", cmake.read_text())
    variables = dict(re.findall(r"set\((\w+)\s+([^\s)]+)\)", text))
    for name, value in variables.items():
        text = text.replace("${" + name + "}", value)
    return set(re.findall(r"[\w./-]+\.\w+", text))


def _needed_files(module: Path) -> set[str]:
    needed = set()
    for path in module.rglob("*"):
        rel = path.relative_to(module).as_posix()
        if not path.is_file() or "__pycache__" in rel or rel.startswith("Testing/"):
            continue
        if path.suffix == ".py" or (rel.startswith("Resources/") and path.suffix in RESOURCE_SUFFIXES):
            needed.add(rel)
    return needed


@pytest.mark.parametrize("module", MODULE_DIRS)
def test_cmake_lists_every_file_the_module_needs(module):
    cmake = REPO / module / "CMakeLists.txt"
    if not cmake.exists():
        pytest.skip(f"{module}/CMakeLists.txt not written yet")
    listed = _cmake_listed_files(cmake)
    needed = _needed_files(REPO / module)
    assert not needed - listed, f"not listed in {module}/CMakeLists.txt: {sorted(needed - listed)}"
    listed_here = {f for f in listed if f.endswith(".py") or f.startswith("Resources/")}
    missing = {f for f in listed_here if not (REPO / module / f).exists()}
    assert not missing, f"listed in {module}/CMakeLists.txt but missing: {sorted(missing)}"
    text = cmake.read_text()
    assert "slicerMacroBuildScriptedModule" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest" in text


def test_module_cmake_installs_shared_resources_where_the_code_looks():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "../Resources/synthseg_labels.csv|SynthSegMONAILib/resources" in text
    assert "../Resources/requirements.txt|Resources" in text
    assert (REPO / "Resources" / "synthseg_labels.csv").is_file()
    # the default model, where the engine's model search looks in an installed copy
    model = "Models/synthseg_monai_default.safetensors"
    assert f"../Resources/{model}|SynthSegMONAILib/resources/Models" in text
    assert (REPO / "Resources" / model).is_file()
    assert (REPO / "Resources" / "requirements.txt").is_file()
    # the training module reads its own requirements from the same Resources folder
    training = (REPO / "SynthSegMONAITraining" / "CMakeLists.txt").read_text()
    assert "../Resources/requirements-training.txt" in training
    assert "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/Resources" in training
    assert (REPO / "Resources" / "requirements-training.txt").is_file()


def test_top_level_cmake_has_extension_metadata():
    text = (REPO / "CMakeLists.txt").read_text()
    project = re.search(r"project\((\w+)\)", text).group(1)
    fields = dict(re.findall(r'set\((EXTENSION_\w+)\s+"?([^")]*)"?\)', text))
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS",
                "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS",
                "EXTENSION_DEPENDS"):
        assert fields.get(key), key
    assert fields["EXTENSION_CATEGORY"] == "Segmentation"
    assert fields["EXTENSION_DEPENDS"] == "PyTorch"
    assert re.search(r'set\(EXTENSION_ICONURL "https://[^"]+\.png"\)', text)
    assert re.search(r'set\(EXTENSION_SCREENSHOTURLS "https://[^"]+\.(png|jpg|jpeg)', text)
    assert "Slicer" in fields["EXTENSION_HOMEPAGE"].rsplit("/", 1)[-1]
    for module in MODULE_DIRS:
        assert f"add_subdirectory({module})" in text
    assert "Slicer_EXTENSION_GENERATE_CONFIG" in text and "Slicer_EXTENSION_CPACK" in text
    assert (REPO / f"{project}.json").is_file(), "the catalogue entry must be named after the project"
    assert (REPO / "LICENSE").is_file()


def test_catalogue_entry_has_the_required_fields():
    project = re.search(r"project\((\w+)\)", (REPO / "CMakeLists.txt").read_text()).group(1)
    entry = json.loads((REPO / f"{project}.json").read_text())
    assert entry["$schema"].startswith(
        "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json")
    assert entry["category"] == "Segmentation"
    assert re.match(r"(https|git)://", entry["scm_url"])
    assert "Slicer" in entry["scm_url"].rsplit("/", 1)[-1]
    assert entry["build_dependencies"] == ["PyTorch"]
    allowed = {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision",
               "scm_type", "scm_url", "tier"}
    assert set(entry) <= allowed


def test_icon_is_a_128px_png():
    from PIL import Image

    with Image.open(MODULE_DIR / "Resources" / "Icons" / "SynthSegMONAI.png") as im:
        assert im.format == "PNG" and im.size == (128, 128)


# --- Extensions Index and Extension Manager --------------------------------------------------
def test_catalogue_entry_is_formatted_as_the_index_lint_wants():
    """The index runs prettier with prettier-plugin-multiline-arrays (wrap threshold 0): 2-space
    indent, every array element on its own line, a final newline, no tabs or trailing blanks."""
    text = (REPO / "SynthSegMONAI.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, ensure_ascii=False) + "\n"
    assert not re.search(r"\[[^\]\n]+\]", text), "an array on one line"
    assert "\t" not in text and not re.search(r"[ \t]+\n", text)


def _screenshot_path() -> Path:
    url = re.search(r'set\(EXTENSION_SCREENSHOTURLS "([^"]+)"\)', (REPO / "CMakeLists.txt").read_text()).group(1)
    assert url.startswith("https://raw.githubusercontent.com/") and "/main/" in url
    return REPO / url.split("/main/", 1)[1]


def test_screenshot_exists_is_large_enough_and_small_on_disk():
    from PIL import Image

    path = _screenshot_path()
    assert path.is_file(), f"{path} missing"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 1000 and im.height >= 500
    assert path.stat().st_size <= 400 * 1024
    readme = (REPO / "README.md").read_text()
    assert f"]({path.relative_to(REPO).as_posix()})" in readme
    assert (REPO / "Utilities" / "make_screenshot.py").is_file()


def test_screenshot_script_renders_a_segmentation(tmp_path):
    """The script (VTK offscreen) on a small synthetic head: four views, coloured segments."""
    import nibabel as nib
    from PIL import Image

    from SynthSegMONAILib import labels as label_table
    from SynthSegMONAISlicerLib.testing import phantom

    shape, m = (48, 56, 44), np.diag([1.2, 1.1, 1.3, 1.0])
    m[:3, 3] = -np.asarray(shape) * np.diag(m)[:3] / 2
    nib.save(nib.Nifti1Image(phantom(shape, m).astype(np.float32), m), str(tmp_path / "t1.nii.gz"))
    labels = np.zeros(shape, np.int16)
    labels[8:24, 10:46, 8:36], labels[24:40, 10:46, 8:36] = 2, 41  # left and right white matter (RAS)
    labels[20:28, 24:32, 16:24] = 17
    nib.save(nib.Nifti1Image(labels, m), str(tmp_path / "seg.nii.gz"))
    script = REPO / "Utilities" / "make_screenshot.py"
    done = subprocess.run([sys.executable, str(script), "--image", str(tmp_path / "t1.nii.gz"), "--seg",
                           str(tmp_path / "seg.nii.gz"), "--output", str(tmp_path / "shot.png"), "--panel", "300",
                           "--thumbnail", str(tmp_path / "thumb.png")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "shot.png") as im:
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.shape == (600, 600, 3)
    hippocampus = np.array(label_table.structure(17).color)
    for top, left in ((0, 0), (0, 300), (300, 0), (300, 300)):  # axial, 3D, sagittal, coronal
        view = rgb[top + 30:top + 300, left:left + 300].reshape(-1, 3).astype(int)
        assert (np.abs(view - hippocampus).sum(axis=1) < 60).any(), (top, left)
    with Image.open(tmp_path / "thumb.png") as im:
        assert im.size == (260, 280)


UI_ATTRIBUTES = {"title", "helpText", "acknowledgementText", "text", "toolTip"}
UI_CALLS = {"addItem", "errorDisplay", "infoDisplay", "warningDisplay", "delayDisplay", "confirmOkCancelDisplay"}


def _untranslated(path: Path) -> list[str]:
    """User-visible string literals not passed through ``_()`` (assigned to labels, shown in dialogs)."""
    def literal(node) -> bool:
        return (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip() != "") or \
            isinstance(node, ast.JoinedStr) or (isinstance(node, ast.BinOp) and (literal(node.left) or literal(node.right)))

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr in UI_ATTRIBUTES
                                                for t in node.targets) and literal(node.value):
            found.append(f"{path.name}:{node.lineno}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in UI_CALLS \
                and node.args and literal(node.args[0]):
            found.append(f"{path.name}:{node.lineno}")
    return found


@pytest.mark.parametrize("path", [MODULE_DIR / "SynthSegMONAI.py",
                                  REPO / "SynthSegMONAITraining" / "SynthSegMONAITraining.py"],
                         ids=lambda p: p.name)
def test_user_visible_strings_are_translatable(path):
    assert _untranslated(path) == []
    text = path.read_text()
    assert "from slicer.i18n import tr as _" in text
    assert 'translate("qSlicerAbstractCoreModule", "Segmentation")' in text


def test_the_translation_check_finds_a_bare_string(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('self.ui.applyButton.text = "Segment"\nslicer.util.errorDisplay(f"failed: {e}")\n'
                   'self.ui.modelInfoLabel.text = ""\nself.parent.title = _("Fine")\n')
    assert _untranslated(bad) == ["bad.py:1", "bad.py:2"]
