"""Real-scan validation during training scores what users get: the engine's pipeline, then
``synthseg-monai evaluate``."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import DEFAULT_MODEL, SHARED

LABELLED = SHARED / "data" / "eval" / "labelled"


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory) -> Path:
    """A subject folder holding a 128^3 crop (most of the brain) of a real T1 and of its aseg."""
    subject = LABELLED / "hebbianloop-sub-01"
    if not subject.is_dir():
        pytest.fail(f"labelled scans not found at {LABELLED} (set SYNTHSEG_MONAI_SHARED)")
    root = tmp_path_factory.mktemp("real")
    (root / "sub-01").mkdir()
    (root / "empty-subject").mkdir()  # no image: skipped
    box = (slice(64, 192), slice(70, 198), slice(64, 192))
    for name in ("T1", "aseg"):
        img = nib.load(str(subject / f"{name}.mgz"))
        crop = img.slicer[box]
        nib.save(nib.Nifti1Image(np.asarray(crop.dataobj), crop.affine), str(root / "sub-01" / f"{name}.nii.gz"))
    return root


@pytest.mark.slow
def test_real_validation_gives_the_dice_of_the_command_line(real_folder, tmp_path):
    from SynthSegMONAILib.cli import main
    from SynthSegMONAILib.evaluation import evaluate_files
    from SynthSegMONAILib.model_file import load_model
    from SynthSegMONAITrainingLib.distributed import DistInfo
    from SynthSegMONAITrainingLib.validation import load_real_cases, validate_real

    model, info = load_model(DEFAULT_MODEL)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = load_real_cases(str(real_folder), "T1.nii.gz", "aseg.nii.gz")
    assert [c.name for c in cases] == ["sub-01"]

    scores = validate_real(model, cases, info.labels, DistInfo())

    # what a user does: segment with the model file, then score the result
    seg = tmp_path / "seg.nii.gz"
    assert main(["--i", str(real_folder / "sub-01" / "T1.nii.gz"), "--o", str(seg),
                 "--model", str(DEFAULT_MODEL), "--threads", "2"]) == 0
    by_cli = evaluate_files(seg, real_folder / "sub-01" / "aseg.nii.gz", "aseg", info.labels)
    cli_dice = {label: d for label, d in by_cli.dice.items() if label in info.labels}
    assert scores["dice"].keys() == cli_dice.keys()
    for label, d in cli_dice.items():
        assert scores["dice"][label] == pytest.approx(d, abs=1e-9), label
    assert scores["mean_dice"] > 0.5  # a trained model on most of a real brain (0.63 when written)
    # the caller's network is untouched: same weights, still training
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_real_validation_refuses_a_folder_without_cases(tmp_path):
    from SynthSegMONAITrainingLib.validation import load_real_cases

    with pytest.raises(FileNotFoundError, match="real validation folder not found"):
        load_real_cases(str(tmp_path / "nowhere"), "T1.mgz", "aseg.mgz")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "T1.mgz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no subject folder"):
        load_real_cases(str(tmp_path), "T1.mgz", "aseg.mgz")


@pytest.mark.slow
def test_a_training_run_records_its_real_scan_dice(real_folder, tmp_path):
    import csv

    from training_fixtures import needs_maps, run_train, subset_maps, tiny_args

    if needs_maps.args[0]:
        pytest.fail("the SynthSeg training label maps are not available (set SYNTHSEG_MONAI_SHARED)")
    maps = subset_maps(tmp_path, ["training_seg_01.nii.gz", "training_seg_02.nii.gz"])
    out = tmp_path / "run"
    args = tiny_args(maps, out, 4) + ["--set", "validation.every=4", "--set", f"validation.real_images={real_folder}",
                                      "--set", "validation.real_image_name=T1.nii.gz",
                                      "--set", "validation.real_label_name=aseg.nii.gz"]
    done = run_train(args)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("real_mean_dice")]
    assert rows, "no validation row with a real-scan Dice"
    assert 0.0 <= float(rows[-1]["real_mean_dice"]) <= 1.0
