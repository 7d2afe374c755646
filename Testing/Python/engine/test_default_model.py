"""The trained default model that ships: what it is, where it comes from, and the README's main
command, which must segment the sample scan on a fresh clone without any --model."""

from __future__ import annotations

import csv
import os
import re
import shlex

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import DEFAULT_MODEL, REPO
from safetensors import safe_open

from SynthSegMONAILib.labels import synthseg_labels
from SynthSegMONAILib.model_file import load_model, read_model_info
from SynthSegMONAILib.model_registry import resolve_model

CSF = 24


@pytest.fixture
def no_user_models(tmp_path, monkeypatch):
    """Only the models that ship are found (none from the user's home or $SYNTHSEG_MONAI_MODELS)."""
    monkeypatch.setenv("SYNTHSEG_MONAI_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SYNTHSEG_MONAI_MODELS", raising=False)


def test_the_default_model_is_found_without_model_and_stored_in_float16(no_user_models):
    assert resolve_model() == DEFAULT_MODEL
    with safe_open(str(DEFAULT_MODEL), framework="pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.float16}
    assert DEFAULT_MODEL.stat().st_size < 30e6
    net, info = load_model(DEFAULT_MODEL)  # the checksum is verified here
    assert next(net.parameters()).dtype == torch.float32  # computed in float32
    assert info.labels == synthseg_labels("2.0") and CSF in info.labels  # SynthSeg 2.0's 33 labels, CSF too


def test_the_default_model_records_every_round_and_its_dice_on_real_scans():
    prov = read_model_info(DEFAULT_MODEL).provenance
    rounds = prov["rounds"]
    assert len(rounds) >= 2
    for r in rounds:
        assert r["device"] and r["steps"] > 0 and r["samples"] >= r["steps"] and r["minutes"] > 0
        dice = r["synthetic_validation"]["dice"]
        assert len(dice) == 33 and all(0 <= v <= 1 for v in dice.values())
    evaluation = prov["evaluation"]
    for resolution in ("1mm", "5mm"):
        assert evaluation[resolution]["structures"] == 31 and evaluation[resolution]["scans"] == 3
        assert evaluation[resolution]["mean_dice"] >= 0.70  # the bar for shipping a default model
    assert rounds[-1]["real_t1_evaluation"] == {res: e["mean_dice"] for res, e in evaluation.items()}


def _readme_main_command() -> list[str]:
    """The synthseg-monai part of the README's first command (setup && ... && synthseg-monai ...)."""
    text = (REPO / "README.md").read_text()
    line = next(x.strip() for x in text.splitlines() if x.strip().startswith("python3 -m venv"))
    last = line.split("&&")[-1]
    args = shlex.split(last)
    assert args[0].endswith("bin/synthseg-monai")
    return args[1:]


@pytest.mark.slow
def test_the_readme_main_command_segments_the_sample_scan_with_the_default_model(no_user_models, tmp_path,
                                                                                  monkeypatch, capsys):
    from SynthSegMONAILib.cli import main

    args = _readme_main_command()
    assert "--model" not in args  # works on a fresh clone, with nothing to download or convert
    os.symlink(REPO / "Testing", tmp_path / "Testing")
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--threads", "2"]) == 0
    assert "loading synthseg_monai_default.safetensors" in capsys.readouterr().out

    seg = np.asarray(nib.load(str(tmp_path / "out" / "sample_t1_colin27_synthseg.nii.gz")).dataobj)
    assert set(np.unique(seg)) == set(synthseg_labels("2.0"))  # every structure found
    with open(tmp_path / "out" / "volumes.csv", newline="") as f:
        header, row = list(csv.reader(f))
    volumes = {name: float(v) for name, v in zip(header[1:], row[1:])}
    assert 1200e3 <= volumes["total intracranial"] <= 2000e3  # mm^3: an adult head
    sides = {re.sub("^left ", "", n): (v, volumes[n.replace("left", "right", 1)])
             for n, v in volumes.items() if n.startswith("left ")}
    assert len(sides) == 14  # 14 structures in each hemisphere
    for name, (left, right) in sides.items():
        if left > 3000:  # structures of 3 cm^3 or more: left and right within 20 %
            assert 0.8 <= left / right <= 1.25, (name, left, right)


def test_the_slicer_modules_default_model_choice_is_the_shipped_model(no_user_models):
    from SynthSegMONAISlicerLib.models import list_models
    from SynthSegMONAISlicerLib.models import resolve_model as module_resolve

    path, header = module_resolve("")  # the *Default model* entry of the Model list
    assert path == DEFAULT_MODEL and header.labels == synthseg_labels("2.0")
    assert ("synthseg_monai_default", DEFAULT_MODEL) in list_models()


def test_models_marks_the_default_model(no_user_models, capsys):
    from SynthSegMONAILib.cli import main

    assert main(["models"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("synthseg_monai_default\t"))
    assert "33 labels (default: used without --model)" in line and str(DEFAULT_MODEL) in line
