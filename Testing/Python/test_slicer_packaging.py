"""Extension packaging: UI file, CMake file lists, catalogue entry, metadata."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

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
    assert (REPO / "Resources" / "requirements.txt").is_file()


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
