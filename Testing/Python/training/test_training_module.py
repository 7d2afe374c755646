"""The headless Slicer module's logic (importable without Slicer) and its CMake listing."""

from __future__ import annotations

import importlib.util
import re

from training_fixtures import REPO

MODULE_DIR = REPO / "SynthSegMONAITraining"


def _load_module():
    spec = importlib.util.spec_from_file_location("SynthSegMONAITraining", MODULE_DIR / "SynthSegMONAITraining.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_logic_runs_without_slicer(tmp_path, capsys):
    mod = _load_module()
    logic = mod.SynthSegMONAITrainingLogic()
    assert logic.default_config().training.synthseg_version == "1.0"
    mod.SynthSegMONAITrainingTest().runTest()
    assert logic.resume(str(tmp_path)) == 1  # nothing to resume: clear error, no exception
    assert "no checkpoint.pt" in capsys.readouterr().err


def test_cmake_lists_every_script_and_resource():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    listed = set(re.findall(r"\$\{MODULE_NAME\}Lib/(\w+\.py)", text))
    present = {p.name for p in (MODULE_DIR / "SynthSegMONAITrainingLib").glob("*.py")}
    assert listed == present
    assert "train.py" in text and "WITH_GENERIC_TESTS" in text
    assert "synthseg_generation_labels.csv" in text and "Lib/resources" in text
    for cfg in (MODULE_DIR / "configs").glob("*.yaml"):
        assert f"configs/{cfg.name}" in text
