"""MONAI bundles: exported from a model file, run by MONAI's own runner, equal to the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import make_tiny_model
from training_fixtures import needs_maps, subset_maps

from SynthSegMONAILib.cli import main
from SynthSegMONAILib.model_file import load_model, read_model_info, save_model

#: MONAI's bundle schema: the fields every bundle's metadata.json carries
REQUIRED = ("version", "monai_version", "pytorch_version", "numpy_version", "optional_packages_version",
            "task", "description", "authors", "copyright", "network_data_format", "changelog", "license")


@pytest.mark.slow
def test_bundle_runs_with_monai_and_equals_the_command_line(imported_models, keras_ref, tmp_path):
    scan = keras_ref / "inputs" / "flair_crop.nii.gz"
    bundle = tmp_path / "bundle"
    assert main(["export-bundle", "--model", str(imported_models["2.0"]), "--output-dir", str(bundle)]) == 0
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                        str(bundle / "configs" / "inference.json"), "--meta_file",
                        str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle),
                        "--input_image", str(scan), "--output_dir", str(tmp_path / "bundle_out"),
                        "--fast", "True", "--device", "cpu"],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert main(["--i", str(scan), "--o", str(tmp_path / "cli"), "--vol", str(tmp_path / "cli" / "volumes.csv"),
                 "--model", str(imported_models["2.0"]), "--fast", "--cpu"]) == 0
    name = "flair_crop_synthseg.nii.gz"
    a, b = nib.load(str(tmp_path / "bundle_out" / name)), nib.load(str(tmp_path / "cli" / name))
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    assert np.allclose(a.affine, b.affine)
    assert (tmp_path / "bundle_out" / "volumes.csv").read_bytes() == (tmp_path / "cli" / "volumes.csv").read_bytes()


def test_bundle_layout_metadata_and_model_card(tmp_path):
    model_path = make_tiny_model(tmp_path / "tiny.safetensors")
    model, info = load_model(model_path)
    info.provenance = {"rounds": [{"device": "NVIDIA H200", "steps": 2703, "samples": 5406, "minutes": 7.8,
                                   "synthetic_validation": {"mean_dice": 0.693}}],
                       "evaluation": {"1mm": {"mean_dice": 0.678, "scans": 3, "dice": {"17": 0.7}}}}
    save_model(model_path, model, info)
    bundle = tmp_path / "bundle"
    assert main(["export-bundle", "--model", str(model_path), "--output-dir", str(bundle)]) == 0
    files = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
    assert files == ["LICENSE", "configs/inference.json", "configs/metadata.json", "configs/multi_gpu_train.json",
                     "configs/train.json", "docs/README.md", "models/model.safetensors"]
    assert read_model_info(bundle / "models" / "model.safetensors").labels == info.labels  # checksum intact
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    for key in REQUIRED:
        assert meta.get(key) not in (None, "", {}), key
    pred = meta["network_data_format"]["outputs"]["pred"]
    hippocampus = str(info.labels.index(17))  # channels are in ascending label order
    assert pred["num_channels"] == 33 and pred["channel_def"][hippocampus] == "Left-Hippocampus"
    assert pred["label_values"][hippocampus] == 17
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 1
    assert meta["eval_metrics"]["mean_dice_1mm"] == 0.678
    for name in ("inference.json", "train.json"):
        config = json.loads((bundle / "configs" / name).read_text())
        assert "bundle_root" in config and "output_dir" in config
    card = (bundle / "docs" / "README.md").read_text()
    assert "| 1 | NVIDIA H200 | 2703 | 5406 | 7.8 |" in card
    assert "| 1mm | 0.678 | 3 |" in card and "| Left-Hippocampus | 0.700 |" in card
    assert not list(bundle.glob("*.pkl")) and not list(bundle.rglob("*.pt"))
    # an existing, non-empty folder is never overwritten
    assert main(["export-bundle", "--model", str(model_path), "--output-dir", str(bundle)]) == 1


@pytest.mark.slow
@needs_maps
def test_bundle_training_runs_with_monai_and_fails_loudly(tmp_path):
    maps = subset_maps(tmp_path, ["training_seg_01.nii.gz", "training_seg_02.nii.gz"])
    bundle = tmp_path / "bundle"
    assert main(["export-bundle", "--model", str(make_tiny_model(tmp_path / "m.safetensors")),
                 "--output-dir", str(bundle)]) == 0
    tiny = ("['--set','data.downsample=4','--set','data.validation_maps=1','--set','network.levels=3',"
            "'--set','network.features=8','--set','training.l2_warmup_steps=0','--set','validation.samples=1',"
            "'--no-progress']")
    base = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
            str(bundle / "configs" / "train.json"), "--meta_file", str(bundle / "configs" / "metadata.json"),
            "--bundle_root", str(bundle), "--steps", "2", "--crop_size", "32", "--device", "cpu",
            "--extra_args", tiny]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    r = subprocess.run([*base, "--label_maps", str(maps)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    _, info = load_model(bundle / "training" / "last.safetensors")
    assert info.provenance["steps"] == 2
    r = subprocess.run([*base, "--label_maps", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "t2")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0 and "label-map folder not found" in r.stderr
